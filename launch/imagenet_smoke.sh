#!/usr/bin/env bash
# The ImageNet path end to end on the CPU in a few minutes: generate a small ImageNet-format data
# set from Fashion-MNIST (1000 training, 300 test images), write it as FFCV .beton files, train
# configs/imagenet/smoke.yaml (FFCV loaders, torchvision ResNet-18 at 64 px, GraNet-ST to 90 %,
# evaluation every epoch; it ends near top-1 0.9, chance is 0.1).
# Extra arguments are config overrides, e.g. data.loader=torchvision or run.name=smoke2.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/install.sh"
cd "$ROOT"
DISTSPARSE="${DISTSPARSE_VENV:-$ROOT/.venv}/bin/distsparse"
DATA=data/smoke-imagenet
[[ -d $DATA/train ]] || "$DISTSPARSE" make-smoke-imagenet --out "$DATA"
for split in train val; do
  [[ -f $DATA/$split.beton ]] || "$DISTSPARSE" write-beton --src "$DATA/$split" --out "$DATA/$split.beton"
done
exec "$DISTSPARSE" train configs/imagenet/smoke.yaml "data.path=$DATA" "$@"
