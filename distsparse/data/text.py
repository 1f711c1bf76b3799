"""Byte-level text of Debian's `fortunes` package: a seeded split by fortune, blocks of bytes.

Corpus: every regular file of the directory whose name has no extension (`.dat` files are
`strfile` indexes, `.u8` names are symlinks to the same text), read in sorted order. A file holds
fortunes separated by lines of a single ``%``. The split is by fortune: a permutation seeded by
`data.text.split_seed` holds out the first `val_fraction` of the fortunes for validation, so no
fortune is in both parts, whatever the training seed. Each part is its fortunes, in file order,
joined by the ``%`` separator lines into one byte stream.

Blocks: inputs are `block_size` consecutive bytes and targets the same bytes one further on.
Training cuts the stream into blocks of `block_size` from an offset in [0, block_size) drawn per
epoch (so block edges move between epochs) and draws a permutation of the blocks; global batch b
is blocks [b*B, (b+1)*B) of it and rank r of W takes its contiguous slice, as `TensorLoader`
does, so 1 or N workers see the same global batches. Validation uses the blocks from offset 0,
in order, in whole global batches only (every rank gets a non-empty slice, and the set does not
depend on the world size).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from distsparse.config import TextConfig
from distsparse.errors import ConfigError

__all__ = ["BYTE_VOCABULARY", "ByteBlockLoader", "fortunes_loaders", "read_fortunes", "split_fortunes"]

BYTE_VOCABULARY = 256
"""Tokens of a byte-level model: one per byte value."""

_SEPARATOR_LINE = re.compile(rb"^%$\n?", re.MULTILINE)
"""A line holding only `%`: it ends one fortune of a fortune file."""


def read_fortunes(directory: Path) -> list[bytes]:
    """Every fortune of the fortune files in `directory`, files in sorted order."""
    fortunes: list[bytes] = []
    for path in sorted(directory.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file():
            continue
        chunks = _SEPARATOR_LINE.split(path.read_bytes().replace(b"\r\n", b"\n"))
        fortunes.extend(chunk.strip(b"\n") + b"\n" for chunk in chunks if chunk.strip())
    return fortunes


def split_fortunes(fortunes: list[bytes], val_fraction: float,
                   seed: int) -> tuple[list[bytes], list[bytes]]:
    """(train, validation): a seeded permutation holds out round(val_fraction * n) fortunes
    (at least one of each part); both keep the corpus order."""
    count = len(fortunes)
    held = min(max(round(val_fraction * count), 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    validation = set(order[:held].tolist())
    train = [f for i, f in enumerate(fortunes) if i not in validation]
    return train, [f for i, f in enumerate(fortunes) if i in validation]


def _stream(fortunes: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"%\n".join(fortunes)), dtype=torch.uint8)


class ByteBlockLoader:
    """(inputs, targets) of int64 bytes, (B/W, block_size) each, from one byte stream."""

    mean = torch.zeros(1, 1, 1, 1)
    std = torch.ones(1, 1, 1, 1)
    """No pixels: identity statistics (`BatchLoader` asks for them)."""

    def __init__(self, stream: torch.Tensor, block_size: int, global_batch: int, seed: int,
                 train: bool, rank: int = 0, world_size: int = 1,
                 chosen: torch.Tensor | None = None) -> None:
        """`chosen`: only these blocks (indices into the stream's blocks), e.g. a calibration set."""
        if global_batch % world_size:
            raise ConfigError(f"config key 'train.batch_size' = {global_batch}: expected a "
                              f"multiple of the world size {world_size}")
        self.stream, self.block_size = stream, block_size
        self.global_batch, self.seed, self.train = global_batch, seed, train
        self.rank, self.world_size = rank, world_size
        # Blocks per epoch, the same from any offset < block_size (one byte is kept for targets).
        self.blocks = (len(stream) - block_size) // block_size if chosen is None else len(chosen)
        self.chosen = chosen

    def __len__(self) -> int:
        return self.blocks // self.global_batch

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of global batches start, start+1, ... of `epoch`."""
        size = self.block_size
        if self.train:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(0, size, (1,), generator=generator))
            order = torch.randperm(self.blocks, generator=generator)
        else:
            offset, order = 0, torch.arange(self.blocks)
        local = self.global_batch // self.world_size
        positions = torch.arange(size + 1)
        for b in range(start, len(self)):
            begin = b * self.global_batch + self.rank * local
            picked = order[begin : begin + local]
            starts = offset + (picked if self.chosen is None else self.chosen[picked]) * size
            window = self.stream[starts[:, None] + positions].long()
            yield window[:, :-1], window[:, 1:]

    def subset(self, index: torch.Tensor, global_batch: int, seed: int, train: bool) -> ByteBlockLoader:
        """A loader over blocks `index` of this one's stream (one process), e.g. a calibration set."""
        return ByteBlockLoader(self.stream, self.block_size, global_batch, seed, train,
                               chosen=index if self.chosen is None else self.chosen[index])


def fortunes_loaders(path: str, text: TextConfig, global_batch: int, seed: int, rank: int,
                     world_size: int) -> tuple[ByteBlockLoader, ByteBlockLoader]:
    """Train and validation loaders of the fortunes in `path` (data.path); ConfigError names
    data.path when no fortune files are there, train.batch_size when a part has too few blocks."""
    directory = Path(path)
    fortunes = read_fortunes(directory) if directory.is_dir() else []
    if len(fortunes) < 2:
        raise ConfigError(f"config key 'data.path' = {path!r}: no fortune files there; install "
                          "Debian's fortunes package (apt-get install fortunes, "
                          "/usr/share/games/fortunes) or name a directory of fortune files")
    train, validation = split_fortunes(fortunes, text.val_fraction, text.split_seed)
    loaders = (ByteBlockLoader(_stream(train), text.block_size, global_batch, seed, True, rank,
                               world_size),
               ByteBlockLoader(_stream(validation), text.block_size, global_batch, seed, False,
                               rank, world_size))
    for part, loader in zip(("training", "validation"), loaders):
        if len(loader) == 0:
            raise ConfigError(
                f"config key 'train.batch_size' = {global_batch}: the {part} split has "
                f"{loader.blocks} blocks of data.text.block_size={text.block_size} bytes, fewer "
                "than one global batch")
    return loaders
