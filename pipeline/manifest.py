"""`<run_dir>/manifest.json`: what each stage read and wrote. The one place artifact paths are recorded.

A stage's entry is `running` while it works, then `done` or `failed`; only `done` means its outputs are
complete. Later stages read earlier ones through the typed records of `pipeline/records.py` instead of
rebuilding paths from strings.
"""

import json
import platform
from importlib import metadata
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_VERSIONED = ("merge-anneal", "torch", "transformers", "mergekit", "trl", "peft", "datasets", "hydra-core",
              "huggingface_hub", "safetensors")


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

