"""Writing artifacts: a file or folder appears complete or not at all. Cache entries are sealed with their files'
sizes and digests, checked when read, and cloned into run folders (never shared writable files)."""

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

log = logging.getLogger(__name__)

SEAL = ".merge-anneal-entry.json"  # inside a cache entry: its files' sizes and sha256 digests, written last
CHEAP = 256 * 2**20  # files up to this size have their digest checked on every read; larger ones their size
FICLONE = 0x40049409  # linux/fs.h: share a file's blocks copy-on-write (btrfs, XFS, bcachefs, ZFS 2.2+)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(target: Path, fill) -> Path:
    """The one way merge-anneal publishes a file or a folder: `fill(tmp)` writes it at a temporary sibling path,
    which replaces `target` only once `fill` has returned. A reader never sees a half-written `target`: a failed
    writer leaves the old one (or none) and removes its temporary; a killed one leaves a hidden
    `.<name>.partial-<pid>-<thread>` sibling, which `remove_partials` clears: in a cache entry's folder under its
    lock (`through_cache`), in a run folder when its owner resumes it, and the demo build's under its lock.
    Returns `target`."""
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


def remove_partials(folder: Path, name: str | None = None) -> None:
    """Remove what killed `publish` calls left: of `name` in `folder`, or (no name) anywhere under `folder`. Only
    while no other process can be writing there (the run folder's owner, the holder of a cache entry's lock)."""
    found = folder.glob if name else folder.rglob
    for kind in ("partial", "old"):
        for stale in sorted(found(f".*{name or ''}.{kind}-*"), reverse=True):
            _remove(stale)


def write_text(path: Path, text: str) -> Path:
    """`publish` of a text file."""
    return publish(path, lambda tmp: tmp.write_text(text))


def disk_full(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a full disk or quota; libraries wrap it (safetensors: SafetensorError
    "No space left on device (os error 28)", torch.save: RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL)


def seal(entry: Path) -> None:
    """Record every file of a finished cache entry with its size and sha256 digest. Written last: an entry without
    its seal was never finished and is never used."""
    files = {str(p.relative_to(entry)): {"size": p.stat().st_size, "sha256": digest(p)} for p in _files(entry)}
    write_text(entry / SEAL, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def entry_problem(entry: Path, digests: str = "cheap") -> str | None:
    """What is wrong with a sealed cache entry, or None. Always: the seal, the list of files and their sizes;
    sha256 digests of files up to 256 MiB (`digests="cheap"`) or of all (`"all"`)."""
    try:
        sealed = json.loads((entry / SEAL).read_text())["files"]
    except FileNotFoundError:
        return "it has no seal (its writer stopped before finishing, or an older merge-anneal wrote it)"
    except (ValueError, KeyError, TypeError):
        return f"its seal {SEAL} does not parse"
    present = {str(p.relative_to(entry)): p for p in _files(entry)}
    if missing := sorted(set(sealed) - set(present)):
        return f"{missing[0]} is missing"
    if extra := sorted(set(present) - set(sealed)):
        return f"{extra[0]} was added after it was sealed"
    for name, want in sealed.items():
        size = present[name].stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} when sealed"
        if (digests == "all" or size <= CHEAP) and digest(present[name]) != want["sha256"]:
            return f"{name} has changed since it was sealed (sha256 differs)"
    return None


def set_aside(entry: Path, problem: str) -> Path:
    """Move a bad cache entry to `<kind>/.bad/<name>-<time>` (kept for a look; safe to delete) and say so in one
    warning line."""
    (entry.parent / ".bad").mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f"{entry.name}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=entry.parent / ".bad"))
    os.replace(entry, aside)  # onto the empty folder just made: a unique name
    log.warning(
        f"merge-anneal: cache entry {entry} failed its check ({problem}); moved it to {aside} (safe to "
        "delete) and computing it again."
    )
    return aside


def _clone_file(src, dst, mode: str = "auto") -> None:
    """`dst` as `src`'s content without a file both can write. `clone`: a reflink (copy-on-write, no extra disk)
    where the file system has them, else a full copy. `hardlink`: a hard link with the file made read-only (no
    extra disk on any file system; a process that ignores permissions, root, could still write through it, which
    the cache's next check finds). `auto`: a reflink, else a read-only hard link, or a copy when running as root."""
    if mode != "hardlink":
        with open(src, "rb") as s, open(dst, "wb") as d:
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF):
                    raise
        if mode == "clone" or os.geteuid() == 0:
            return shutil.copyfile(src, dst)  # in-kernel copy (sendfile / copy_file_range)
        os.unlink(dst)
    os.chmod(src, 0o444)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


def clone_tree(src: Path, dst: Path, mode: str = "auto") -> None:
    """A cached folder's files (not its seal) at `dst`, sharing no writable file with it (see `_clone_file`)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(SEAL), copy_function=lambda a, b: _clone_file(a, b, mode))


def through_cache(entry: Path, build, target: Path, ranks=None, files: str = "auto", digests: str = "cheap") -> str:
    """Put cache entry `entry`'s files at `target` (replacing what was there); `build(folder)` makes a missing
    entry first (at a hidden name, then sealed and renamed to `entry`). An entry that fails its check
    (`entry_problem`) is set aside and built again. A file lock beside the entry makes parallel jobs (e.g.
    +launcher=submitit_local) wait for the one building it, then find it, instead of building it twice. `files`:
    how the entry's files reach `target` (`pipeline.cache_files`: auto, clone or hardlink, see `_clone_file`);
    `digests`: `pipeline.cache_verify`. Returns "hit" or "miss".

    Under several processes (`ranks`: accelerate's PartialState; every rank calls this) the main rank holds the
    lock and decides hit or miss for all, `build` runs on every rank (it may be collective; it publishes from the
    main rank), and only the main rank seals the entry and clones it to `target`."""
    from filelock import FileLock

    from pipeline import UserError

    if files not in ("auto", "clone", "hardlink") or digests not in ("cheap", "all"):
        raise UserError(
            f"pipeline.cache_files={files!r}, pipeline.cache_verify={digests!r}: cache_files takes auto, "
            "clone or hardlink, cache_verify cheap or all (see conf/config.yaml)."
        )
    entry = Path(entry)
    main = ranks is None or ranks.is_main_process
    lock = nullcontext()
    if main:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry.with_name(f".{entry.name}.lock")))
    with lock:
        state = "miss"
        if main:
            remove_partials(entry.parent, entry.name)  # a killed writer's: we hold the lock
            if entry.exists():
                problem = entry_problem(entry, digests)
                state = "hit" if problem is None else set_aside(entry, problem) and "miss"
        if ranks is not None and ranks.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            state = broadcast_object_list([state], from_process=0)[0]  # the main rank's view
        if state == "miss":  # built and sealed under a hidden name: a visible entry is always complete
            staging = entry.with_name(f".{entry.name}.partial-build")
            build(staging)
            if main:
                seal(staging)
                os.replace(staging, entry)
    if main:
        publish(target, lambda tmp: clone_tree(entry, tmp, files))
    if ranks is not None:
        ranks.wait_for_everyone()
    return state
