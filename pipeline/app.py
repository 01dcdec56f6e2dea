"""The Hydra application: compose the config, run the chosen stages in order, keep the manifest."""

import importlib
import logging
import sys
import textwrap
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import CONF_DIR, UserError, artifacts, demo, logs, manifest, merge_config, models, records, sweep

log = logging.getLogger(__name__)
STAGES = ("merge", "anneal", "eval", "release")  # every stage that exists, in pipeline order


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
    """Refuses a run without `+merge=...`, or in a run folder another live run holds, before Hydra creates the run
    folder or writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if needs_merge_config(config):
            fail(missing_merge_message())
        run_dir = Path(config.hydra.run.dir)
        try:  # a run folder a live run holds: refused before Hydra writes its files there
            if run_dir.is_dir():
                with manifest.owned(run_dir):
                    pass
        except UserError as err:
            fail(str(err))


def fail(message: str) -> None:
    """One paragraph on stderr (and in the run folder's log), exit code 2: how user mistakes end."""
    text = textwrap.fill(f"merge-anneal: error: {message}", width=100, break_long_words=False, break_on_hyphens=False)
    logs.to_log_file(logging.ERROR, text)
    print(text, file=sys.stderr)
    sys.exit(2)


def check_stages(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(
            f"Unknown stage(s) {unknown} in pipeline.stages. Fix: choose from {list(STAGES)}, "
            "e.g. pipeline.stages=[merge]."
        )
    return sorted(names, key=STAGES.index)


def merge_inputs(cfg: DictConfig, stages: list[str], run_dir: Path) -> list[str] | None:
    """The models the run's merge reads, as its config names them: the merge config (a preset or the user's own
    mergekit YAML, whatever `models` says) when the merge runs, else the run folder's merge record; None when
    neither exists yet."""
    if "merge" in stages:
        return merge_config.model_references(merge_config.load(cfg))[0]
    try:
        return records.load(run_dir, records.MergeRecord).inputs.models
    except UserError:
        return None


def in_demo(cfg: DictConfig, model: str) -> bool:
    """A model reference that points into the embedded demo's folder."""
    return Path(model).expanduser().resolve().is_relative_to(demo.demo_dir(cfg.models.cache_dir))


def check_data_fits_models(cfg: DictConfig, stages: list[str], merged: list[str] | None) -> None:
    """The demo's pairs (arithmetic and word reversal, with the demo's recipe) anneal the demo parents only: `merged`,
    the models the merge reads (`merge_inputs`), must all be the demo's."""
    if (
        cfg.data.source == "demo"
        and "anneal" in stages
        and merged is not None
        and not all(in_demo(cfg, m) for m in merged)
        and not cfg.data.get("with_other_models")
    ):
        others = ", ".join(Path(m).name for m in merged if not in_demo(cfg, m))
        raise UserError(
            f"Your merge's models ({others}) would be annealed on the embedded demo's preference pairs "
            "(two-digit sums and reversed words, with the demo's recipe: learning rate 3e-4, max_length "
            "64), since no data was chosen. Fix: name your preference data, data=custom "
            "data.path=prefs.jsonl (a local file or a hub data set id; conf/data/custom.yaml). For a smoke "
            "test on the demo's pairs: data.with_other_models=true."
        )


def run_pipeline(cfg: DictConfig, run_dir: Path, command=None) -> dict:
    """Run the configured stages in `run_dir`, owning it; returns the manifest. Raises UserError on bad input.
    `command`: the invocation's Hydra overrides, recorded for the model card once the folder is ours."""
    run_dir = Path(run_dir).resolve()
    stages = check_stages(cfg.pipeline.stages)
    for name in stages:  # every chosen stage's settings, before the first one starts
        importlib.import_module(f"stages.{name}").check(cfg)
    merged = merge_inputs(cfg, stages, run_dir)
    check_data_fits_models(cfg, stages, merged)
    with manifest.owned(run_dir):
        for name in manifest.check_interrupted(run_dir, cfg.pipeline.resume):
            log.warning(f"{name}: interrupted in an earlier attempt; resuming (pipeline.resume=true)")
        if command is not None:
            manifest.record_command(run_dir, command, cfg.pipeline.stages)
        return _run_stages(cfg, run_dir, stages, merged)


def _run_stages(cfg: DictConfig, run_dir: Path, stages: list[str], merged: list[str] | None) -> dict:
    # The demo is built on first use (never rebuilt while present): when the merge reads its parents, or the anneal
    # its pairs. A merge of other models never builds it.
    if ("merge" in stages and any(in_demo(cfg, m) for m in merged)) or (
        cfg.data.source == "demo" and "anneal" in stages
    ):
        demo.ensure_demo(cfg.models.cache_dir)
    for name in stages:
        if cfg.pipeline.resume and manifest.load(run_dir)["stages"].get(name, {}).get("status") == "done":
            log.info(f"{name}: done in an earlier attempt, skipped (pipeline.resume=true)")
            continue
        stage = importlib.import_module(f"stages.{name}")
        manifest.set_stage(run_dir, name, {"status": "running"})
        started = time.perf_counter()
        try:
            record = stage.run(cfg, run_dir)
        except BaseException as err:
            full = artifacts.disk_full(err)
            try:  # on a full disk these writes may fail too: the stage then stays `running`, never `done`
                manifest.set_stage(
                    run_dir,
                    name,
                    {
                        "status": "failed",
                        "error": f"{type(err).__name__}: {err}",
                        "seconds": round(time.perf_counter() - started, 3),
                        "versions": manifest.versions(),
                    },
                )
                if not isinstance(err, (UserError, KeyboardInterrupt)) and not full:
                    (run_dir / name).mkdir(parents=True, exist_ok=True)
                    (run_dir / name / "error.log").write_text(traceback.format_exc())
            except OSError as second:
                log.warning(f"{name}: could not record the failure in the manifest ({second})")
            if full:
                raise UserError(disk_full_message(name, err, run_dir, cfg)) from None
            raise
        record = record.model_copy(
            update={
                "status": "done",
                "seconds": round(time.perf_counter() - started, 3),
                "versions": manifest.versions(),
            }
        )
        manifest.set_stage(run_dir, name, record.dump())
    return manifest.load(run_dir)


def disk_full_message(stage: str, err: BaseException, run_dir: Path, cfg: DictConfig) -> str:
    where = getattr(err, "filename", None) or f"the run folder {run_dir} or the cache {cfg.pipeline.cache_dir}"
    return (
        f"{stage}: the disk filled up while writing ({where}): {err}. Nothing it wrote was kept or marked done. "
        f"Fix: free space there (`df -h {run_dir}`), or put the run folder (hydra.run.dir) or the cache "
        f"(pipeline.cache_dir) on a larger disk, then continue with `pipeline.resume=true "
        f"hydra.run.dir={run_dir}`."
    )


def free_job_memory(err: BaseException | None = None) -> None:
    """Free a finished run's models before the next job of a sweep runs in this process (a failed run's
    traceback would otherwise keep its stage's frames, and their models, alive)."""
    if err is not None:
        traceback.clear_frames(err.__traceback__)
    models.release_memory()
    torch = sys.modules.get("torch")  # only when a stage imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run. In a sweep (-m) it returns the run's `pipeline.objective` (what an optimising sweeper such as
    +sweep=search reads), a failed run fails only its own job, and memory is freed before the next job."""
    if needs_merge_config(cfg):  # multirun jobs do not pass through RequireMerge.on_run_start
        fail(missing_merge_message())
    logs.route_library_logs(cfg.pipeline.verbose, datasets=set(cfg.pipeline.stages) != {"merge"})
    logging.raiseExceptions = False  # a log line that cannot be written (a full disk) prints no traceback
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        sweep.check_settings(cfg.pipeline)
        # The command line, for the release's model card: stages themselves never read HydraConfig.
        outcome = run_pipeline(cfg, run_dir, command=HydraConfig.get().overrides.task)
        objective = sweep.run_objective(outcome, cfg.pipeline.objective.metric) if sweeping else None
    except Exception as err:
        if sweeping:
            free_job_memory(err)
        if isinstance(err, UserError) and not sweeping:
            fail(str(err))
        raise  # in a sweep, Hydra records the job as failed and runs the next; the sweep summary lists it
    if sweeping:  # the next job runs in this process (a single run's process ends here: nothing to free)
        free_job_memory()
    log.info(closing_block(outcome, run_dir))
    return objective


def closing_block(outcome: dict, run_dir: Path) -> str:
    """How a run ends on the console: the verdict, and where the models, the report and the manifest are."""
    stages = outcome["stages"]
    output = lambda stage, key: stages.get(stage, {}).get("outputs", {}).get(key)
    rows = {
        "verdict": stages.get("eval", {}).get("summary", {}).get("verdict", {}).get("sentence"),
        "merged": output("merge", "model"),
        "annealed": output("anneal", "model"),
        "released": output("release", "model"),
        "report": output("eval", "report"),
        "manifest": str(manifest.manifest_path(run_dir)),
    }
    here = Path.cwd()
    shown = lambda value: str(Path(value).relative_to(here)) if Path(value).is_relative_to(here) else value
    lines = [f"  {name:<9} {value if name == 'verdict' else shown(value)}" for name, value in rows.items() if value]
    return "\n".join(["merge-anneal: done", *lines])
