"""Entries of optiserve's caches (`$OPTISERVE_CACHE/ptq`, `/layouts`): directories of safetensors and JSON, never
pickles.

An entry is written whole into a fresh temp directory beside its final name and renamed into place, so a reader
sees a complete entry or none, and two writers of one key never share a file (the first rename wins; entries with
one key hold the same result). An entry that cannot be read is a miss: a warning names it, it is moved aside and
the caller recomputes and rewrites it.

The cache is bounded: entry keys include the code and the input files, so every upgrade or new checkpoint path
makes new entries. After each write the least recently used entries of the evictable kinds are removed until the
kinds together fit in `OPTISERVE_CACHE_MAX_GB` (default 16); the entry just written is always kept. A read marks
an entry used. Removing an entry a running server has memory-mapped is safe: its pages live until unmapped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

EVICTABLE_KINDS = ("layouts", "ptq")  # `models/` (the converted default model) is the one input, never evicted
DEFAULT_MAX_GB = 16.0


def cache_root() -> Path:
    return Path(os.environ.get("OPTISERVE_CACHE", Path.home() / ".cache" / "optiserve"))


def cache_limit_bytes() -> int:
    value = os.environ.get("OPTISERVE_CACHE_MAX_GB", str(DEFAULT_MAX_GB))
    try:
        return int(float(value) * 2**30)
    except ValueError:
        log.warning("OPTISERVE_CACHE_MAX_GB=%r is not a number; using %s", value, DEFAULT_MAX_GB)
        return int(DEFAULT_MAX_GB * 2**30)


def read_entry(path: Path, read: Callable[[Path], T]) -> T | None:
    """`read(path)`, or None when there is no entry or it is unreadable (then it is discarded with a warning)."""
    if not path.exists():
        return None
    try:
        entry = read(path)
    except Exception as e:  # whatever a damaged entry raises, it is a miss, never a failed start
        log.warning("unreadable cache entry %s (%s: %s); recomputing it", path, type(e).__name__, e)
        discard_entry(path)
        return None
    with contextlib.suppress(OSError):  # a read-only cache still serves; it just cannot record the use
        os.utime(path)
    return entry


def write_entry(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` and rename the directory to `path`; if another writer got there first, keep theirs.
    A cache that cannot be written (read-only, full) costs only the next start's time: a warning, no failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        log.warning("cannot write cache entry %s (%s); it will be recomputed next time", path, e)
        return
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:  # the result is in hand: failing to cache it must not fail the start or the swap
        if path.is_dir():
            log.info("cache entry %s was written meanwhile by another writer; keeping it", path)
        else:
            log.warning("cannot write cache entry %s (%s: %s); it will be recomputed next time", path,
                        type(e).__name__, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if path.parent.name in EVICTABLE_KINDS:
        try:
            evict_least_recent(path.parent.parent, cache_limit_bytes(), keep=path)
        except OSError as e:  # another process evicting at once; the next write tries again
            log.warning("cache eviction under %s stopped (%s)", path.parent.parent, e)


def evict_least_recent(root: Path, limit: int, keep: Path) -> None:
    """Discard the least recently used entries under `root`'s evictable kinds until their sizes sum to `limit`."""
    entries = [e for kind in EVICTABLE_KINDS if (root / kind).is_dir()
               for e in (root / kind).iterdir() if not e.name.startswith(".")]  # dot-names are writes in flight
    used = {e: (entry_mtime(e), entry_bytes(e)) for e in entries}
    total = sum(size for _, size in used.values())
    for entry in sorted(entries, key=lambda e: used[e][0]):
        if total <= limit:
            return
        if entry != keep:
            log.info("cache over %.1f GB: evicting %s (least recently used)", limit / 2**30, entry)
            discard_entry(entry)
            total -= used[entry][1]


def entry_mtime(entry: Path) -> float:
    with contextlib.suppress(OSError):
        return entry.stat().st_mtime
    return 0.0


def entry_bytes(entry: Path) -> int:
    """Bytes on disk of a file or directory; what another process deletes meanwhile counts as 0."""
    files = [entry] if entry.is_file() else entry.rglob("*")
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def file_identity(path: Path) -> list:
    """What a cache key records of an input file: a changed file (path, size or mtime) is a new key."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def discard_entry(path: Path) -> None:
    """Remove an entry: renamed to a unique name first, so no reader or writer ever sees it half deleted."""
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".discarded"))
    with contextlib.suppress(OSError):
        os.replace(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)
