"""Build a folder beside its destination and rename it into place only when it is complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OnnxgenError


def check_destination(out: Path, force: bool, source: str | Path | None = None) -> None:
    """`out` can be made: it does not exist (or force), its parent is a writable folder, and it is neither the
    folder it is made from (with force, that would be replaced while read) nor inside or around it."""
    if source is not None and Path(source).is_dir():
        made, read = out.resolve(), Path(source).resolve()
        if made == read or read in made.parents or made in read.parents:
            where = "is" if made == read else "would be inside, or hold,"
            raise OnnxgenError(f"{out} {where} the folder it is made from ({source}): write it to a folder of its own")
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


def scratch_prefix(out: Path, kind: str) -> str:
    """Name prefix for a hidden folder beside `out` that this process owns (see `building`)."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def _remove_stale(out: Path) -> None:
    """Remove the hidden folders that a killed build for `out` left behind (SIGKILL or a power cut skip
    every cleanup): they carry the builder's process id, and that process is gone. A stale `.old-`
    folder stays: killed between its two renames, it is the only complete copy."""
    prefix = f".{out.name}."
    for path in out.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        kind, _, rest = path.name[len(prefix):].partition("-")
        pid = rest.split("-")[0]
        if kind in ("partial", "raw", "prep") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def building(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden work folder; on success it replaces `out`, on any error or Ctrl-C it is removed."""
    check_destination(out, force)
    out = out.resolve()
    _remove_stale(out)
    work = out.parent / f"{scratch_prefix(out, 'partial')}work"
    work.mkdir()
    try:
        yield work
        if out.exists():
            old = out.parent / f"{scratch_prefix(out, 'old')}replaced"
            out.rename(old)
            work.rename(out)
            shutil.rmtree(old)
        else:
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
