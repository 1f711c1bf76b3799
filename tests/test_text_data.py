"""The byte-level fortunes corpus: reading, the seeded split by fortune, blocks, 1 vs 2 ranks,
and the config checks of text data and the transformers' keys."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distsparse.cli import main
from distsparse.config import FORTUNES_DIR, load_config
from distsparse.data.loader import build_data
from distsparse.data.text import ByteBlockLoader, read_fortunes, split_fortunes
from distsparse.errors import ConfigError

RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "gpt" / "fortunes_rigl.yaml")
TEXT = ["data.name=fortunes", "data.loader=text", "data.text.block_size=16", "train.batch_size=8",
        "model.name=gpt", "model.kwargs.n_positions=16"]


def tiny_fortunes(directory: Path, count: int = 80) -> Path:
    """A fortune directory holding the first `count` fortunes of the installed corpus (plus the
    `.dat` index and `.u8` link the package ships beside each file, which must be ignored)."""
    fortunes = read_fortunes(Path(FORTUNES_DIR))[:count]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tiny").write_bytes(b"%\n".join(fortunes))
    (directory / "tiny.dat").write_bytes(bytes(range(256)))
    (directory / "tiny.u8").symlink_to("tiny")
    return directory


def test_fortune_files_split_at_percent_lines_and_indexes_and_links_are_ignored(tmp_path):
    (tmp_path / "b").write_bytes(b"%\nthird\n%\n%\n\n%\n  indented\n%")
    (tmp_path / "a").write_bytes(b"first\nline two\n%\nsecond 100%\n")
    (tmp_path / "a.dat").write_bytes(b"\x00\x01%\n\x02")
    (tmp_path / "a.u8").symlink_to("a")
    assert read_fortunes(tmp_path) == [b"first\nline two\n", b"second 100%\n", b"third\n",
                                       b"  indented\n"]


def test_the_installed_corpus_is_read_whole():
    fortunes = read_fortunes(Path(FORTUNES_DIR))
    total = sum(len(f) for f in fortunes)
    assert len(fortunes) > 10_000 and 2_000_000 < total < 3_000_000
    assert not any(line == b"%" for f in fortunes for line in f.split(b"\n"))


def test_the_split_is_by_fortune_disjoint_complete_and_seeded():
    numbered = [str(i).encode() for i in range(1000)]  # distinct stand-ins for fortunes
    train, validation = split_fortunes(numbered, 0.1, seed=0)
    assert len(validation) == 100 and not set(train) & set(validation)
    assert set(train) | set(validation) == set(numbered)
    assert train == sorted(train, key=numbered.index)  # each part keeps the corpus order
    fortunes = read_fortunes(Path(FORTUNES_DIR))
    parts = split_fortunes(fortunes, 0.1, seed=0)
    assert len(parts[1]) == round(0.1 * len(fortunes)) and sum(map(len, parts)) == len(fortunes)
    assert split_fortunes(fortunes, 0.1, seed=0) == parts
    assert split_fortunes(fortunes, 0.1, seed=1)[1] != parts[1]


def test_the_training_seed_does_not_move_the_validation_set(tmp_path):
    corpus = str(tiny_fortunes(tmp_path / "corpus"))
    streams = [build_data(load_config(None, [*TEXT, f"data.path={corpus}", f"seed={seed}"])).test.stream
               for seed in (0, 1)]
    assert torch.equal(*streams)
    other = build_data(load_config(None, [*TEXT, f"data.path={corpus}", "data.text.split_seed=1"]))
    assert not torch.equal(streams[0], other.test.stream)


def _blocks_are_windows(stream: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Each input row is a run of the stream, and its target row the same run one byte on."""
    text = bytes(stream.tolist())
    return all(bytes(row.tolist()) in text and torch.equal(x[i, 1:], y[i, :-1])
               and bytes(x[i, :1].tolist()) + bytes(y[i].tolist()) in text
               for i, row in enumerate(x))


def test_blocks_are_shifted_windows_of_the_stream_and_the_grid_moves_per_epoch(tmp_path):
    data = build_data(load_config(None, [*TEXT, f"data.path={tiny_fortunes(tmp_path / 'c')}"]))
    assert data.num_classes == 256 and data.byte_level
    for loader in (data.train, data.test):
        x, y = next(loader.batches(0))
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert _blocks_are_windows(loader.stream, x, y)
    # Random bytes: every 16-byte window is unique, so a block names its position.
    stream = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loader = ByteBlockLoader(stream, 16, 8, seed=0, train=True)
    position = {bytes(stream[i : i + 16].tolist()): i for i in range(len(stream) - 16)}
    starts = [[position[bytes(row.tolist())] for x, _ in loader.batches(epoch) for row in x]
              for epoch in (0, 1)]
    for epoch_starts in starts:  # one offset per epoch, then distinct blocks of the grid
        assert len(set(epoch_starts)) == len(epoch_starts) == len(loader) * 8
        assert len({start % 16 for start in epoch_starts}) == 1
    assert starts[0][0] % 16 != starts[1][0] % 16


def test_validation_takes_whole_global_batches_in_order():
    stream = torch.arange(100, dtype=torch.uint8)
    loader = ByteBlockLoader(stream, 4, 6, seed=0, train=False)
    assert loader.blocks == 24 and len(loader) == 4
    x = torch.cat([x for x, _ in loader.batches(0)])
    assert torch.equal(x, stream[:96].long().reshape(24, 4))


@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_see_the_global_batches_of_one(train):
    stream = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    one = ByteBlockLoader(stream, 16, 8, seed=4, train=train)
    two = [ByteBlockLoader(stream, 16, 8, seed=4, train=train, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == (5000 - 16) // 16 // 8
    for epoch in (0, 1):
        parts = [list(loader.batches(epoch)) for loader in two]
        whole = list(one.batches(epoch))
        for b, (x, y) in enumerate(whole):
            assert parts[0][b][0].shape == (4, 16)
            assert torch.equal(x, torch.cat([parts[0][b][0], parts[1][b][0]]))
            assert torch.equal(y, torch.cat([parts[0][b][1], parts[1][b][1]]))
        later = list(one.batches(epoch, start=5))  # a resume mid-epoch replays the same batches
        assert all(torch.equal(a[0], b[0]) for a, b in zip(later, whole[5:], strict=True))


def test_a_missing_corpus_is_one_line_naming_data_path_and_the_package(tmp_path, capsys):
    run = tmp_path / "run"
    status = main(["train", RECIPE, f"data.path={tmp_path / 'nowhere'}", f"run.dir={run}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and not run.exists()
    assert err.startswith(f"distsparse: error: config key 'data.path' = '{tmp_path / 'nowhere'}'")
    assert "Debian's fortunes package" in err


def test_too_few_blocks_for_a_global_batch_names_the_batch_size(tmp_path):
    corpus = tiny_fortunes(tmp_path / "c", count=20)
    with pytest.raises(ConfigError, match=r"'train.batch_size' = 256: the validation split has \d+ "
                                          "blocks of data.text.block_size=16 bytes"):
        build_data(load_config(None, [*TEXT, f"data.path={corpus}", "train.batch_size=256"]))


VIT = ["data.name=synthetic", "data.loader=synthetic", "model.name=vit"]


@pytest.mark.parametrize(("overrides", "message"), [
    ([*TEXT[:-1], "model.name=small_resnet"], "config key 'model.name' = "
     "'small_resnet': expected a language model for data.name='fortunes' (gpt, or a "
     "pkg.module:factory)"),
    ([*TEXT, "data.name=fashion_mnist", "data.loader=fmnist"], "config key 'model.name' = 'gpt': "
     "expected an image model for data.name='fashion_mnist' (gpt needs token data: "
     "data.name=fortunes)"),
    ([*TEXT, "data.loader=fmnist"], "config key 'data.loader' = 'fmnist': expected a loader for "
     "data.name='fortunes' (fashion_mnist: fmnist; synthetic: synthetic; imagenet: ffcv or "
     "torchvision; fortunes: text)"),
    ([*TEXT, "data.text.block_size=32"], "config key 'data.text.block_size' = 32: expected at "
     "most model.kwargs.n_positions=16, the model's longest context"),
    ([*TEXT, "data.text.val_fraction=1.0"], "config key 'data.text.val_fraction' = 1.0: expected "
     "a value in (0, 1)"),
    ([*TEXT, "model.kwargs.n_head=3"], "config key 'model.kwargs.n_embd' = 256: expected a "
     "multiple of model.kwargs.n_head=3"),
    ([*TEXT, "model.kwargs.layers=2"], "config key 'model.kwargs.layers': model gpt takes "
     "n_layer, n_head, n_embd, n_positions, dropout"),
    ([*TEXT, "model.kwargs.n_layer=0"], "config key 'model.kwargs.n_layer' = 0: expected an "
     "integer >= 1"),
    ([*TEXT, "model.kwargs.dropout=1.5"], "config key 'model.kwargs.dropout' = 1.5: expected a "
     "value in [0, 1)"),
    ([*TEXT, "train.betas=[0.9,1.0]"], "config key 'train.betas' = [0.9, 1.0]: expected two "
     "values in [0, 1)"),
    ([*TEXT, "train.betas=[0.9]"], "config key 'train.betas' = [0.9]: expected two values in "
     "[0, 1)"),
    ([*VIT, "model.kwargs.patch_size=5"], "config key 'model.kwargs.patch_size' = 5: expected a "
     "divisor of model.kwargs.image_size=28"),
    ([*VIT, "model.kwargs.num_heads=3"], "config key 'model.kwargs.hidden_dim' = 128: expected a "
     "multiple of model.kwargs.num_heads=3"),
    ([*VIT, "model.kwargs.n_layer=3"], "config key 'model.kwargs.n_layer': model vit takes "
     "image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout"),
])
def test_bad_text_and_transformer_keys_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    assert str(raised.value) == message
