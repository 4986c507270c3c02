"""Build a folder beside its destination and rename it into place only when it is complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OnnxgenError


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OnnxgenError(f"{out} already exists (use --force to replace it)")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OnnxgenError(f"cannot write {out}: {parent} is not a folder") from None
    except PermissionError:
        raise OnnxgenError(f"cannot write {out}: no permission to create {parent}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OnnxgenError(f"cannot write {out}: no write permission in {parent}")


def check_disk(out: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(out.resolve().parent).free
    if free < needed_bytes:
        raise OnnxgenError(f"not enough disk for {out}: need about {needed_bytes / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


@contextmanager
def building(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden work folder; on success it replaces `out`, on any error or Ctrl-C it is removed."""
    check_destination(out, force)
    out = out.resolve()
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            work.rename(out)
            shutil.rmtree(old)
        else:
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
