"""The Hydra application: compose the config, run the chosen stages in order, keep the manifest."""

import importlib
import sys
import textwrap
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import CONF_DIR, UserError, demo, manifest

STAGES = ("merge", "anneal", "eval")  # every stage that exists, in pipeline order


def merge_options() -> list[str]:
    """The `+merge=<option>` names: one YAML file per mergekit method, plus `custom`."""
    return sorted(p.stem for p in (CONF_DIR / "merge").glob("*.yaml"))


def missing_merge_message() -> str:
    return (
        "No merge chosen. Choose one with +merge=<option>, e.g. `python -m pipeline +merge=slerp`; "
        f"options: {', '.join(merge_options())}. "
        "`+merge=custom merge.config_file=PATH` runs your own mergekit YAML."
    )


def needs_merge_config(cfg: DictConfig) -> bool:
    return "merge" in cfg.pipeline.stages and "merge" not in cfg


class RequireMerge(Callback):
    """Refuses a run without `+merge=...` before Hydra creates the run folder."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if needs_merge_config(config):
            fail(missing_merge_message())


def fail(message: str) -> None:
    """One paragraph on stderr, exit code 2: how user mistakes end."""
    print(textwrap.fill(f"merge-anneal: error: {message}", width=100, break_long_words=False,
                        break_on_hyphens=False), file=sys.stderr)
    sys.exit(2)


def check_stages(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"Unknown stage(s) {unknown} in pipeline.stages. Fix: choose from {list(STAGES)}, "
                        "e.g. pipeline.stages=[merge].")
    return sorted(names, key=STAGES.index)


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured stages in `run_dir`; returns the manifest. Raises UserError on bad input."""
    run_dir = Path(run_dir).resolve()
    stages = check_stages(cfg.pipeline.stages)
    if "demo" in (cfg.models.source, cfg.data.source):
        demo.ensure_demo(cfg.models.cache_dir)  # built on first use, never rebuilt while present
    for name in stages:
        if cfg.pipeline.resume and manifest.load(run_dir)["stages"].get(name, {}).get("status") == "done":
            print(f"{name}: done in an earlier attempt, skipped (pipeline.resume=true)")
            continue
        stage = importlib.import_module(f"stages.{name}")
        manifest.set_stage(run_dir, name, {"status": "running"})
        started = time.perf_counter()
        try:
            entry = stage.run(cfg, run_dir)
        except BaseException as err:
            error = f"{type(err).__name__}: {err}"
            manifest.set_stage(run_dir, name, {"status": "failed", "error": error,
                                               "seconds": round(time.perf_counter() - started, 3),
                                               "versions": manifest.versions()})
            if not isinstance(err, (UserError, KeyboardInterrupt)):
                (run_dir / name).mkdir(parents=True, exist_ok=True)
                (run_dir / name / "error.log").write_text(traceback.format_exc())
            raise
        entry = {"status": "done", **entry, "seconds": round(time.perf_counter() - started, 3),
                 "versions": manifest.versions()}
        manifest.set_stage(run_dir, name, entry)
    return manifest.load(run_dir)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if needs_merge_config(cfg):  # multirun jobs do not pass through RequireMerge.on_run_start
        fail(missing_merge_message())
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_pipeline(cfg, run_dir)
    except UserError as err:
        fail(str(err))
    print(f"merge-anneal: done; manifest: {manifest.manifest_path(run_dir)}")
