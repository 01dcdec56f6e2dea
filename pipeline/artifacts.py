"""Writing artifacts: a file or folder appears complete or not at all; cached folders are shared by hard links."""

import os
import shutil
import threading
from contextlib import nullcontext
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(target: Path, fill) -> Path:
    """The one way merge-anneal publishes a file or a folder: `fill(tmp)` writes it at a temporary sibling path,
    which replaces `target` only once `fill` has returned. A reader never sees a half-written `target`: a failed
    writer leaves the old one (or none) and removes its temporary; a killed one leaves a hidden
    `.<name>.partial-<pid>-<thread>` sibling, which the next publish does not clean up (the demo build does,
    under its lock). Returns `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{threading.get_ident()}"
    tmp, old = (target.with_name(f".{target.name}.{kind}-{tag}") for kind in ("partial", "old"))
    _remove(tmp)
    try:
        fill(tmp)
        if target.is_dir() and not target.is_symlink():  # os.replace cannot replace a folder: move it aside first
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        _remove(tmp)
        _remove(old)
    return target


def write_text(path: Path, text: str) -> Path:
    """`publish` of a text file."""
    return publish(path, lambda tmp: tmp.write_text(text))


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link a cached folder's files (no extra disk), copying where links are impossible."""
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def through_cache(entry: Path, build, target: Path, ranks=None) -> str:
    """Put cache entry `entry`'s files at `target` (hard links), replacing what was there; `build(entry)` makes a
    missing entry first. A file lock beside the entry makes parallel jobs (e.g. +launcher=submitit_local) wait
    for the one building it, then find it, instead of building it twice. Returns "hit" or "miss".

    Under several processes (`ranks`: accelerate's PartialState; every rank calls this) the main rank holds the
    lock and decides hit or miss for all, `build` runs on every rank (it may be collective; it publishes from the
    main rank), and only the main rank links the entry to `target`."""
    from filelock import FileLock

    entry = Path(entry)
    main = ranks is None or ranks.is_main_process
    lock = nullcontext()
    if main:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry.with_name(f".{entry.name}.lock")))
    with lock:
        state = "hit" if entry.is_dir() else "miss"
        if ranks is not None and ranks.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            state = broadcast_object_list([state], from_process=0)[0]  # the main rank's view
        if state == "miss":
            build(entry)
    if main:
        publish(target, lambda tmp: link_tree(entry, tmp))
    if ranks is not None:
        ranks.wait_for_everyone()
    return state
