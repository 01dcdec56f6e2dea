"""Writing artifacts: a folder appears complete or not at all; cached folders are shared by hard links."""

import os
import shutil
from contextlib import contextmanager
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


def publish_cached(cached_dir: Path, target: Path) -> None:
    """Put a cached folder's files at `target` (hard links), replacing what was there."""
    replace_dir(target, lambda tmp: link_tree(cached_dir, tmp))


@contextmanager
def locked(entry: Path):
    """Hold a file lock beside a cache entry: parallel jobs (e.g. +launcher=submitit_local) wait for the one
    computing it, then find it, instead of computing it twice."""
    from filelock import FileLock

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.with_name(f".{entry.name}.lock"))):
        yield
