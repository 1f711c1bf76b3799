"""Where an export writes: a temporary file or folder beside the target, renamed onto it when
complete."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distsparse.errors import DistsparseError

__all__ = ["ExportError", "refuse_existing", "staged"]


class ExportError(DistsparseError):
    """A model, run or output that cannot be exported as asked (the message says why)."""


def refuse_existing(out: Path) -> None:
    """ExportError unless `out` is free and its folder exists: an export never replaces a file."""
    if out.exists() or out.is_symlink():
        raise ExportError(f"--out {out} already exists; choose another path")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: folder {out.parent} does not exist")


@contextmanager
def staged(out: Path, directory: bool = False) -> Iterator[Path]:
    """A temporary file (or folder) beside `out`, renamed onto `out` (fsynced) if the block ends
    without error; removed otherwise."""
    refuse_existing(out)
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        for path in [*temporary.rglob("*")] if directory else [temporary]:
            if path.is_file():
                with path.open("rb+") as file:
                    os.fsync(file.fileno())
        refuse_existing(out)  # made while this export ran: keep the other file
        os.replace(temporary, out)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary)
        else:
            temporary.unlink(missing_ok=True)
