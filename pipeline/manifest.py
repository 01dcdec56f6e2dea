"""`<run_dir>/manifest.json`: what each stage read and wrote. The one place artifact paths are recorded.

A stage's entry is `running` while it works (with the process: pid, host, start), then `done` or `failed`; only
`done` means its outputs are complete. One process owns a run folder at a time (`owned`): a lock the operating
system releases when the process ends, however it ends, so a `running` entry found by the next owner was
interrupted. Later stages read earlier ones through the typed records of `pipeline/records.py` instead of
rebuilding paths from strings.
"""

import contextlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from pipeline import UserError

MANIFEST_NAME = "manifest.json"
_VERSIONED = (
    "merge-anneal",
    "torch",
    "transformers",
    "mergekit",
    "trl",
    "peft",
    "datasets",
    "hydra-core",
    "huggingface_hub",
    "safetensors",
)


def manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / MANIFEST_NAME


def load(run_dir: Path) -> dict:
    path = manifest_path(run_dir)
    if path.is_file():
        return json.loads(path.read_text())
    return {"run_dir": str(Path(run_dir).resolve()), "stages": {}}


def save(run_dir: Path, manifest: dict) -> None:
    """Write atomically, so a killed run never leaves a torn manifest."""
    from pipeline.artifacts import write_text

    write_text(manifest_path(run_dir), json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def set_stage(run_dir: Path, name: str, entry: dict) -> dict:
    if entry.get("status") == "running":
        entry = {**entry, "pid": os.getpid(), "host": platform.node(), "started": _now()}
    manifest = load(run_dir)
    manifest["stages"][name] = entry
    save(run_dir, manifest)
    return manifest


def record_command(run_dir: Path, overrides, stages) -> dict:
    """Append one `python -m pipeline` invocation (its Hydra task overrides and the stages it ran) to
    `commands`: the release's model card shows the commands that made the released model."""
    manifest = load(run_dir)
    manifest.setdefault("commands", []).append({"overrides": list(overrides), "stages": list(stages)})
    save(run_dir, manifest)
    return manifest


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


_owned: set[Path] = set()


@contextlib.contextmanager
def owned(run_dir: Path):
    """This process owns `run_dir` while the block runs; another live process holding it is refused, naming it.
    Re-entrant within the process."""
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir).resolve()
    if run_dir in _owned:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(str(run_dir / ".merge-anneal.lock")), run_dir / ".merge-anneal.owner.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = json.loads(owner.read_text()) if owner.is_file() else {}
        raise UserError(
            f"The run folder {run_dir} is in use by another merge-anneal process (pid "
            f"{who.get('pid', '?')} on {who.get('host', '?')}, since {who.get('since', '?')}). Fix: wait "
            "for it to finish, or give this run a folder of its own (hydra.run.dir=...)."
        ) from None
    _owned.add(run_dir)
    try:
        owner.write_text(json.dumps({"pid": os.getpid(), "host": platform.node(), "since": _now()}))
        yield
    finally:
        _owned.discard(run_dir)
        lock.release()


def check_interrupted(run_dir: Path, resume: bool) -> list[str]:
    """Stages left `running` by a process that is gone (call while owning the folder). Without `resume` they are
    refused with the command that resumes them; returns their names."""
    manifest = load(run_dir)
    stopped = {name: entry for name, entry in manifest["stages"].items() if entry.get("status") == "running"}
    if stopped and not resume:
        name, entry = next(iter(stopped.items()))
        commands = manifest.get("commands") or [{"overrides": []}]
        again = " ".join(
            [
                "python -m pipeline",
                *commands[-1]["overrides"],
                "pipeline.resume=true",
                f"hydra.run.dir={Path(run_dir).resolve()}",
            ]
        )
        raise UserError(
            f"The {name} stage of {Path(run_dir).resolve()} was interrupted: its process (pid "
            f"{entry.get('pid', '?')} on {entry.get('host', '?')}, started {entry.get('started', '?')}) "
            f"is gone and the stage is not done. Fix: resume it, finished stages skipped and training "
            f"from its last checkpoint: {again}"
        )
    if stopped:  # what the killed process was writing: hidden `.<name>.partial-<pid>-<thread>` folders and files
        from pipeline.artifacts import remove_partials

        remove_partials(Path(run_dir))
    return list(stopped)
