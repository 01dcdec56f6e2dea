"""Writing artifacts: a folder appears complete or not at all; cached folders are shared by hard links."""

import os
import shutil
from pathlib import Path


def replace_dir(target: Path, fill) -> None:
    """`fill(tmp)` writes a folder; it replaces `target` only if `fill` finishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link a cached folder's files (no extra disk), copying where links are impossible."""
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def through_cache(entry: Path, build, target: Path) -> str:
    """Put cache entry `entry`'s files at `target` (hard links), replacing what was there; `build(entry)` makes a
    missing entry first. A file lock beside the entry makes parallel jobs (e.g. +launcher=submitit_local) wait
    for the one building it, then find it, instead of building it twice. Returns "hit" or "miss"."""
    from filelock import FileLock

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.with_name(f".{entry.name}.lock"))):
        state = "hit" if entry.is_dir() else "miss"
        if state == "miss":
            build(entry)
    replace_dir(target, lambda tmp: link_tree(entry, tmp))
    return state
