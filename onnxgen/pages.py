"""After a load, the model file's pages come into memory one at a time, as decoding reads them (Linux).

onnxruntime maps model.onnx.data and, once it has packed a weight into its own layout, unmaps it; what stays
mapped is what a kernel still reads from the file (the embeddings: a row per token) or what onnxruntime keeps
without reading it again (MatMulNBits' scales, packed with the weights yet kept mapped: 17% of an int4
file). For those mappings, two madvise(2) hints:
- MADV_RANDOM: reading a row maps that page alone. Without it a fault maps the whole readahead window or
  large folio around the page (about 0.5 MiB here, once the load has read the file through), and a few
  hundred distinct tokens bring the whole embedding into the process.
- MADV_DONTNEED: give back what the load read; what decoding reads again comes back from the page cache.
  Only for a mapping that holds no page of its own (copy-on-write), so nothing can be lost.
`give_back` gives back the process's own memory the same way: the rows of a server's cache once their
request has ended (cache.py); `small_pages` keeps every key/value cache out of transparent huge pages.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MADV_RANDOM, MADV_DONTNEED, MADV_NOHUGEPAGE = 1, 4, 15
SMAPS = Path("/proc/self/smaps")


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def mappings(path: Path) -> Iterator[tuple[int, int, dict[str, int]]]:
    """(start, end, smaps' KiB fields such as Rss and Anonymous) of each mapping of `path` in this process."""
    target = str(path.resolve())
    current: tuple[int, int, dict[str, int]] | None = None
    for line in SMAPS.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            if current:
                yield current
            start, end = (int(x, 16) for x in fields[0].split("-"))
            current = (start, end, {}) if len(fields) >= 6 and " ".join(fields[5:]) == target else None
        elif current and fields[0].endswith(":") and len(fields) == 3 and fields[2] == "kB":
            current[2][fields[0][:-1]] = int(fields[1])
    if current:
        yield current


def page_on_demand(data_file: Path, random: bool = True) -> int:
    """Advise every mapping of `data_file`; returns how many there were (0 off Linux, or with no data file).
    random=False gives back what the load read and no more: for weights that every step reads through (load's
    mapped_weights), which MADV_RANDOM would read from a cold file in 4 KiB pieces."""
    if not SMAPS.exists() or not data_file.exists():
        return 0
    count = 0
    for start, end, kib in mappings(data_file):
        if random:
            _advise(start, end - start, MADV_RANDOM)
        if kib.get("Anonymous") == 0:  # no page copied on write
            _advise(start, end - start, MADV_DONTNEED)
        count += 1
    return count


def give_back(address: int, size: int) -> None:
    """Hand the whole pages in [address, address + size) of this process's own (anonymous, private) memory back
    to the system; they read as zeros when next touched (Linux's MADV_DONTNEED; elsewhere nothing happens)."""
    _advise(address, size, MADV_DONTNEED)


def small_pages(address: int, size: int) -> None:
    """Keep [address, address + size) in 4 KiB pages (Linux's MADV_NOHUGEPAGE): memory written sparsely, such as
    a key/value cache (a position of each head of each row a step), where transparent huge pages would bring in
    2 MiB around every position written."""
    _advise(address, size, MADV_NOHUGEPAGE)


def _advise(address: int, size: int, advice: int) -> None:
    if sys.platform != "linux":
        return
    start, end = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE, (address + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _libc().madvise(start, end - start, advice)
