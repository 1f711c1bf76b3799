"""The `distsparse` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distsparse.errors import DistsparseError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distsparse", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser(
        "train", help="train a sparse network",
        description="Train from a YAML config with dotted overrides, e.g. "
        "`distsparse train configs/quickstart.yaml method.sparsity=0.95`.",
    )
    train.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--resume", metavar="RUN_DIR", type=Path,
                       help="continue the run in RUN_DIR from its last checkpoint")
    return parser


def _train(args: argparse.Namespace) -> None:
    from distsparse.config import load_config
    from distsparse.engine.trainer import train

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).is_file():
        config_path, overrides = None, [config_path, *overrides]
    if config_path is None:
        if args.resume is None:
            raise DistsparseError("train needs a CONFIG file, or --resume RUN_DIR")
        config_path = args.resume / "config.yaml"
        overrides = ["run.stop_at_step=null", *overrides]  # the stop that paused the run ends here
    overrides += [f"run.dir={args.resume}"] if args.resume is not None else []
    train(load_config(config_path, overrides), resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distsparse` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.verb == "train":
            _train(args)
    except DistsparseError as exc:
        print(f"distsparse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distsparse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
