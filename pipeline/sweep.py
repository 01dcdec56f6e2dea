"""Sweep summaries: rank a multirun's jobs by `pipeline.objective`, merged against annealed side by side, with
paired comparisons between the jobs' annealed models.

`<sweep_dir>/summary.json` (a `runs` list, one entry per job: overrides, status, metrics, cache use),
`summary.md` and `summary.png` are rebuilt from the jobs' own folders (`.hydra/hydra.yaml` for the job number
and overrides, `manifest.json` for everything else) after every job, so a sweep that stops early still has
one, and once more when the sweep ends (`complete: true`). `SweepSummary` is the Hydra callback that does it
(registered in conf/config.yaml); the rest are plain functions over manifests and eval reports. The markdown, the
plots and the curves are in pipeline/sweep_report.py.
"""

import itertools
import json
import logging
import math
import os
import socket
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline import UserError, manifest, records
from pipeline.artifacts import publish, write_text
from pipeline.sweep_report import (
    COMPARED,
    CURVES_PNG,
    SUMMARY_MD,
    SUMMARY_PNG,
    curves,
    model_value,
    plot_curves,
    plot_summary,
    summary_markdown,
)

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
DIRECTIONS = ("maximize", "minimize")
COMPARE_MODES = ("best", "all", "none")


# ------------------------------------------------------------------------------------------------ objective


def check_settings(pipeline: DictConfig) -> None:
    """Cheap checks of `pipeline.objective` and `pipeline.compare_jobs` before any work; the objective's metric
    path itself is checked against the eval report."""
    objective = pipeline.objective
    if pipeline.compare_jobs not in COMPARE_MODES:
        raise UserError(
            f"pipeline.compare_jobs={pipeline.compare_jobs} is not one of {', '.join(COMPARE_MODES)}. "
            "Fix: e.g. pipeline.compare_jobs=all."
        )
    if objective.direction not in DIRECTIONS:
        raise UserError(
            f"pipeline.objective.direction={objective.direction} is neither maximize nor minimize. "
            "Fix: pipeline.objective.direction=maximize (or minimize)."
        )
    head = str(objective.metric).split(".")[0]
    if "." not in str(objective.metric) or not (
        head in ("merged", "annealed", "comparison", "win_rate", "verdict") or head.startswith("parent:")
    ):
        raise UserError(
            f"pipeline.objective.metric={objective.metric} does not name a metric of eval/metrics.json. "
            "Fix: <model>.<metric> with model merged, annealed or parent:<name> (e.g. "
            "annealed.preference_accuracy, annealed.retention.worst, annealed.benchmarks.<task>), or a path such "
            "as comparison.annealed_vs_merged.preference_accuracy.delta, win_rate.vs.merged.length_controlled or "
            "verdict.ship."
        )


def objective_value(report: records.EvalReport, metric: str) -> float:
    """The number `metric` names in an eval report: `<model>.<metric>[.<key>]` with model merged, annealed or
    parent:<name>, or a path from the report's root (comparison.annealed_vs_merged.*.delta, win_rate.vs.merged.*,
    verdict.ship)."""
    node = report.lookup(metric)
    if not isinstance(node, (int, float)):  # a bool (verdict.ship) ranks as 1 or 0
        raise UserError(
            f"pipeline.objective.metric={metric} does not name a number in the eval report. Fix: e.g. "
            "annealed.preference_accuracy, annealed.retention.worst, annealed.benchmarks.<task>, annealed.perplexity "
            "(direction=minimize), win_rate.vs.merged.length_controlled, verdict.ship."
        )
    return float(node)


def run_objective(run_manifest: dict, metric: str) -> float | None:
    """A finished run's objective (from its manifest's eval report); None when it ran no eval."""
    entry = run_manifest["stages"].get("eval")
    if not entry or entry.get("status") != "done":
        return None
    return objective_value(records.read_report(entry["outputs"]["metrics"]), metric)


# -------------------------------------------------------------------------------------------------- reading


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: wherever Hydra saved a job's `.hydra/hydra.yaml`."""
    return sorted({p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/hydra.yaml") if ".submitit" not in p.parts})


def read_job(job_dir: Path, metric: str, tie_break: str | None = None) -> dict:
    """One job as the summary shows it: number, overrides, status, metrics, cache use, timings."""
    hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    record = manifest.load(job_dir)
    stages, job = record["stages"], record.get("job", {})
    failed = [f"{name}: {e.get('error')}" for name, e in stages.items() if e.get("status") == "failed"]
    if failed or job.get("status") == "failed":
        status = "failed"
    elif job.get("status") == "done" or (stages and all(e.get("status") == "done" for e in stages.values())):
        status = "done"
    else:  # running now, or stopped before it finished (see its log)
        status = "incomplete"
    done = records.completed(stages)
    merge, anneal, evaluation = (done.get(name) for name in ("merge", "anneal", "eval"))
    run = {
        "job": hydra_cfg["job"]["num"],
        "run_dir": str(job_dir.resolve()),
        "overrides": list(hydra_cfg["overrides"]["task"]),
        "status": status,
        "error": (failed or [job.get("error")])[0] if status == "failed" else None,
        "objective": None,
        "rank": None,
        "cache": {
            "merge": merge.cache.get("merge") if merge else None,
            "reference_logps": anneal.cache.get("reference_logps") if anneal else None,
        },
        "seconds": {name: e["seconds"] for name, e in stages.items() if "seconds" in e},
    }
    if merge:
        run["merge_method"] = merge.merge_method
        run["sources"] = [source.model_dump(mode="json") for source in merge.inputs.sources]  # provenance
    if anneal:
        run["anneal"] = {
            "reference": anneal.inputs.reference_label,
            "loss_type": anneal.trainer.loss_type,
            "method": anneal.config.anneal.method,
            "method_args": anneal.config.anneal.method_args,
            "reference_source": (
                anneal.inputs.reference_source.model_dump(mode="json") if anneal.inputs.reference_source else None
            ),
        }
    if evaluation:
        report = records.read_report(evaluation.outputs.metrics)
        run["metrics"] = {name: model.model_dump(exclude_unset=True) for name, model in report.models.items()}
        run["annealed_vs_merged"] = report.annealed_vs_merged
        run["items"] = evaluation.outputs.items
        try:
            run["objective"] = objective_value(report, metric)
        except UserError as err:
            run["objective_error"] = str(err)
        if tie_break:
            try:
                run["tie_break"] = objective_value(report, tie_break)
            except UserError:
                run["tie_break"] = None
    return run


# -------------------------------------------------------------------------------------------------- summary


def rank(runs: list[dict], direction: str) -> list[dict]:
    """Runs with an objective first, best first (ties: the higher `tie_break` where the objective has one, then
    the lower job number), `rank` 1..n; then the others."""
    ranked = sorted(
        (r for r in runs if r["objective"] is not None),
        key=lambda r: (
            -r["objective"] if direction == "maximize" else r["objective"],
            -r["tie_break"] if r.get("tie_break") is not None else math.inf,
            r["job"],
        ),
    )
    for position, run in enumerate(ranked, 1):
        run["rank"] = position
    return ranked + sorted((r for r in runs if r["objective"] is None), key=lambda r: r["job"])


def label_runs(runs: list[dict]) -> None:
    """`label`: the overrides that set a job apart from the others (all of them when it is alone)."""
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if len(runs) > 1 else set()
    for run in runs:
        run["label"] = " ".join(o for o in run["overrides"] if o not in shared) or f"job {run['job']}"


def cache_counts(runs: list[dict]) -> dict:
    """How often each cache was hit or missed (a miss computed the merge / the reference log-probs)."""
    counts = {"merge": {}, "reference_logps": {}}
    for run in runs:
        for kind, state in run["cache"].items():
            if state is not None:
                counts[kind][state] = counts[kind].get(state, 0) + 1
    return counts


def compare_runs(runs: list[dict], mode: str, resamples: int, seed: int) -> list[dict]:
    """Paired bootstrap of the annealed models' per-item metrics between jobs (the same held-out items): each
    job against the best (`best`), or every pair (`all`). `differs`: the 95% interval excludes 0."""
    from pipeline import metrics as M

    done = [r for r in runs if r["status"] == "done" and r.get("items") and Path(r["items"]).is_file()]
    if mode == "best":
        best = next((r for r in done if r["rank"] == 1), None)
        pairs = [(best, r) for r in sorted(done, key=lambda r: r["job"]) if best and r is not best]
    elif mode == "all":
        pairs = list(itertools.combinations(sorted(done, key=lambda r: r["job"]), 2))
    else:
        pairs = []
    loaded = {}

    def items(run: dict) -> dict:
        if run["job"] not in loaded:
            loaded[run["job"]] = json.loads(Path(run["items"]).read_text())
        return loaded[run["job"]]

    out = []
    for a, b in pairs:
        entry = {"a": a["job"], "b": b["job"], "a_label": a["label"], "b_label": b["label"]}
        if items(a)["key"] != items(b)["key"]:
            out.append({**entry, "comparable": False, "reason": "different held-out items"})
            continue
        x, y = items(a)["models"]["annealed"], items(b)["models"]["annealed"]
        compared = {name: M.paired_bootstrap(x[name], y[name], resamples, seed) for name in COMPARED}
        compared["perplexity"] = M.paired_bootstrap_perplexity(x["nll"], y["nll"], x["nll_tokens"], resamples, seed)
        docs_a, docs_b = items(a).get("benchmark_docs", {}), items(b).get("benchmark_docs", {})
        for task in [t for t in docs_a if docs_a[t] == docs_b.get(t)]:  # the same documents in both runs
            compared[f"benchmarks.{task}"] = M.paired_bootstrap(
                x["benchmarks"][task]["values"], y["benchmarks"][task]["values"], resamples, seed
            )
        for value in compared.values():
            value["differs"] = value["ci95"][0] > 0 or value["ci95"][1] < 0
        out.append({**entry, "comparable": True, "metrics": compared})
    return out


def differing(pairs: list[dict]) -> dict:
    """Per compared metric, the [a, b] job pairs whose interval excludes 0."""
    found = {}
    for pair in (p for p in pairs if p["comparable"]):
        for metric, value in pair["metrics"].items():
            found.setdefault(metric, [])
            if value["differs"]:
                found[metric].append([pair["a"], pair["b"]])
    return found


def summarize(
    sweep_dir: Path, runs: list[dict], objective: dict, compare: str, bootstrap: dict, complete: bool
) -> dict:
    """summary.json's content from the jobs (`read_job`)."""
    runs = rank(runs, objective["direction"])
    if runs:
        label_runs(runs)
    statuses = [r["status"] for r in runs]
    pairs = compare_runs(runs, compare, bootstrap["resamples"], bootstrap["seed"])
    return {
        "sweep_dir": str(Path(sweep_dir).resolve()),
        "complete": complete,
        "objective": objective,
        "best": next((r["job"] for r in runs if r["rank"] == 1), None),
        "jobs": {"total": len(runs), **{s: statuses.count(s) for s in ("done", "failed", "incomplete")}},
        "cache": cache_counts(runs),
        "comparisons": {
            "mode": compare,
            "model": "annealed",
            "bootstrap": bootstrap,
            "pairs": pairs,
            "differ": differing(pairs),
        },
        "runs": runs,
        "conclusion": conclusion(runs, objective),
    }


def conclusion(runs: list[dict], objective: dict) -> str | None:
    """One sentence: the job that came first, its objective and held-out preference accuracy with intervals."""
    best = next((r for r in runs if r["rank"] == 1), None)
    if best is None:
        return None
    interval = lambda value, ci: f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    model, _, metric = objective["metric"].partition(".")
    value, ci = model_value(best, model, metric) if model in ("merged", "annealed") else (best["objective"], None)
    accuracy = model_value(best, "annealed", "preference_accuracy")
    others = sum(r["rank"] is not None for r in runs) - 1
    return (
        f"`{best.get('label', best['job'])}` came first of {others + 1} ranked jobs by {objective['metric']} "
        f"({objective['direction']}): {interval(best['objective'] if value is None else value, ci)}"
        + (
            f", with held-out preference accuracy {interval(*accuracy)} (95% intervals)"
            if accuracy[0] is not None
            else ""
        )
        + "."
    )


# ----------------------------------------------------------------------------------------------- writing


def write_summary(sweep_dir: Path, config: DictConfig, complete: bool) -> dict:
    """Rebuild summary.json, summary.md and summary.png from the sweep's job folders (under a file lock:
    jobs of a parallel launcher end at the same time)."""
    from filelock import FileLock

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    objective = {
        "metric": str(config.pipeline.objective.metric),
        "direction": str(config.pipeline.objective.direction),
        "tie_break": config.pipeline.objective.get("tie_break"),
    }
    bootstrap = {"resamples": int(config.eval.bootstrap_resamples), "seed": int(config.eval.seed), "confidence": 0.95}
    with FileLock(str(sweep_dir / ".summary.lock")):
        runs = [read_job(d, objective["metric"], objective["tie_break"]) for d in job_dirs(sweep_dir)]
        summary = summarize(sweep_dir, runs, objective, str(config.pipeline.compare_jobs), bootstrap, complete)
        curve = config.pipeline.get("curve")
        if curve:  # metrics against a numeric setting (e.g. +sweep=data_size): curves.png, summary.json `curves`
            table = curves(summary["runs"], str(curve.x), list(curve.metrics))
            summary["curves"] = {"x": str(curve.x), "metrics": table}
            publish(sweep_dir / CURVES_PNG, lambda p: plot_curves(summary["curves"]["metrics"], str(curve.x), p))
        write_text(sweep_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
        write_text(sweep_dir / SUMMARY_MD, summary_markdown(summary))
        publish(sweep_dir / SUMMARY_PNG, lambda p: plot_summary(summary, p))
    return summary


class SweepSummary(Callback):
    """Records each sweep job's outcome in its manifest (`job`) and rewrites the sweep summary after every job
    and at the end of the sweep. Single runs are left alone."""

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        record = manifest.load(job_dir)
        failed = job_return.status != JobStatus.COMPLETED
        error = job_return._return_value if failed else None  # `return_value` would re-raise it
        record["job"] = {
            "num": config.hydra.job.num,
            "status": "failed" if failed else "done",
            "error": f"{type(error).__name__}: {error}" if failed else None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }  # where its logs are
        manifest.save(job_dir, record)
        write_summary(Path(config.hydra.sweep.dir), config, complete=False)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        summary = write_summary(Path(config.hydra.sweep.dir), config, complete=True)
        best = next((r for r in summary["runs"] if r["rank"] == 1), None)
        jobs = summary["jobs"]
        log.info(
            f"merge-anneal: sweep done: {jobs['done']} of {jobs['total']} jobs finished"
            + (f", {jobs['failed']} failed" if jobs["failed"] else "")
            + (
                f"; best: job {best['job']} ({best['label']}), {summary['objective']['metric']} {best['objective']:.4g}"
                if best
                else ""
            )
            + f"; summary: {Path(summary['sweep_dir']) / SUMMARY_MD}"
        )
