"""Entries of optiserve's caches (`$OPTISERVE_CACHE/ptq`, `/layouts`): directories of safetensors and JSON, never
pickles.

An entry is written whole into a fresh temp directory beside its final name and renamed into place, so a reader
sees a complete entry or none, and two writers of one key never share a file (the first rename wins; entries with
one key hold the same result). An entry that cannot be read is a miss: a warning names it, it is moved aside and
the caller recomputes and rewrites it.
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


def read_entry(path: Path, read: Callable[[Path], T]) -> T | None:
    """`read(path)`, or None when there is no entry or it is unreadable (then it is discarded with a warning)."""
    if not path.exists():
        return None
    try:
        return read(path)
    except Exception as e:  # whatever a damaged entry raises, it is a miss, never a failed start
        log.warning("unreadable cache entry %s (%s: %s); recomputing it", path, type(e).__name__, e)
        discard_entry(path)
        return None


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
