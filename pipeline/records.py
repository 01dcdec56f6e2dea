"""Typed stage records: what one stage hands to the next, read from and written to `manifest.json`.

Each stage returns a record; the app stores it as the stage's manifest entry (the JSON keeps the shape users
know: `inputs`, `outputs`, `config`, ...). Later stages, the release and the sweep summary read earlier stages
through these classes (`load(run_dir, MergeRecord)`), so a renamed field fails validation in one place
instead of a string path failing in another stage at run time. Every field a stage writes is declared here;
unknown keys are still accepted, only so that older manifests read.

The eval stage's report (`eval/metrics.json`) is `EvalReport`: eval writes it, release and the sweep summary read
it with `read_report`, and nothing else takes it apart by string keys.
"""

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline import UserError, manifest

OMITTED_WHEN_UNSET = {"omitted_when_unset": True}


def optional(default=None):
    """A field left out of the manifest entry unless the stage set it (a chain's intermediates, a hub push)."""
    return Field(default=default, json_schema_extra=OMITTED_WHEN_UNSET)


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # older manifests only: every field written is declared

    def dump(self) -> dict:
        """The manifest entry: JSON types; `optional` fields only where set."""
        return self.model_dump(mode="json", exclude=self._omitted() or None)

    def _omitted(self) -> dict:
        out = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if (field.json_schema_extra or {}).get("omitted_when_unset") and name not in self.model_fields_set:
                out[name] = True
            elif isinstance(value, Record) and value._omitted():
                out[name] = value._omitted()
        return out


class ModelSource(Record):
    """Where a model came from, recorded when it is resolved: the local folder read, and for a hub download
    its id and the commit actually downloaded."""

    path: str
    hub_id: str | None = None
    revision: str | None = None

    def public_name(self, revision: bool = True) -> str:
        """`org/name@commit` for a hub download, else the folder's own name (no local path in public files)."""
        if self.hub_id:
            return f"{self.hub_id}@{self.revision}" if revision and self.revision else self.hub_id
        return Path(self.path).name


class StageRecord(Record):
    """Fields every stage entry has once the app has stored it."""

    status: str = "done"
    seconds: float | None = None
    versions: dict = {}


# ---------------------------------------------------------------------------------------------------- merge


class MergeInputs(Record):
    models: list[str]
    parents: list[str]
    base_model: str | None
    config_file: str | None = None
    sources: list[ModelSource] = []  # every referenced model, in config order


class MergeOutputs(Record):
    """The merged model and its resolved config; a mergekit-multi chain adds `intermediates`: each intermediate
    merge's folder, by name (left out otherwise, so a single merge's entry keeps its shape)."""

    model: str
    config: str
    intermediates: dict[str, str] | None = optional()


class MergeConfig(Record):
    merge: dict  # the resolved mergekit configuration (MergeConfiguration.model_dump)
    merge_options: dict
    models: dict | None = None  # the `models` group, where a method preset read it (not for merge.config_file)


class MergeStep(Record):
    """One merge of a mergekit-multi chain, in the order they ran (the final merge last, without a name)."""

    name: str | None
    merge_method: str
    model: str  # its output folder
    models: list[str]  # the models it read (earlier merges of the chain among them)
    cache: dict


class MergeRecord(StageRecord):
    inputs: MergeInputs  # for a chain: the models it starts from (no intermediate)
    outputs: MergeOutputs
    config: MergeConfig  # for a chain: the final merge's
    merge_method: str  # `moe` for a mixture of experts (mergekit-moe)
    cache: dict
    mergekit_version: str | None = None
    chain: list[MergeStep] = []  # a mergekit-multi chain's merges; empty for one merge

    @property
    def parameters(self) -> dict:
        return self.config.merge.get("parameters") or {}

    def source(self, path: str) -> ModelSource:
        """The provenance of one of the merge's model folders."""
        return next((s for s in self.inputs.sources if s.path == path), ModelSource(path=path))


# --------------------------------------------------------------------------------------------------- anneal


class Trainer(Record):
    """The DPOConfig fields later stages read (the rest pass through)."""

    beta: float
    loss_type: list[str]
    loss_weights: list[float] | None = None
    max_length: int | None = None
    truncation_mode: str | None = None
    learning_rate: float | None = None
    lr_scheduler_type: str | None = None
    max_steps: int | None = None
    per_device_train_batch_size: int | None = None


class AnnealSettings(Record):
    reference: str | int | None = None
    reference_combine: str | None = None
    method: str = "dpo"
    method_args: dict = {}
    peft: dict | None = None
    trainer: Trainer


class DataSettings(Record):
    source: str
    path: str | None = None
    heldout_text: str | None = None  # a held-out text corpus that comes with the data


class AnnealConfig(Record):
    anneal: AnnealSettings
    data: DataSettings


class AnnealInputs(Record):
    model: str
    reference: str
    reference_path: str
    reference_label: str
    reference_source: ModelSource | None = None
    data: dict
    references: dict | None = None  # anneal.reference=parents: per parent its path, fingerprint, store, cache


class AnnealOutputs(Record):
    model: str
    reference_logps: str
    metrics: str
    adapter: str | None = None


class AnnealRecord(StageRecord):
    inputs: AnnealInputs
    outputs: AnnealOutputs
    reference_fingerprint: str
    config: AnnealConfig
    precision: dict  # stages/anneal/perf.py: Precision
    data: dict  # pair counts: train_pairs, heldout_pairs, dropped
    cache: dict  # reference_logps (hit, miss), per parent with anneal.reference=parents
    merge_check: dict | None = None  # the perplexity gate: texts, perplexity per model, ratio, max_ratio, flagged
    memory_plan: dict | None = None  # stages/anneal/memory.py: MemoryPlan.record()
    processes: int = 1
    distributed_type: str | None = None  # accelerate's: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
    process: dict = {}  # malloc_keeps_freed_memory, gc_skipped_objects
    perf: dict = {}  # switches, and what applied
    saved_for_backward: dict = {}  # what LeanSavedTensors stored leaner, over training
    reference_batch_size: int | None = None
    resumed_from: str | None = None  # the checkpoint training resumed from
    extrapolation: dict | None = optional()  # anneal.extrapolate: every alpha's validation accuracy, the one kept
    final_log: dict = {}  # the trainer's last log line
    seconds_by_phase: dict[str, float] = {}

    @property
    def trainer(self) -> Trainer:
        return self.config.anneal.trainer


# ----------------------------------------------------------------------------------------------------- eval


class EvalOutputs(Record):
    metrics: str
    report: str
    plots: list[str]
    items: str


class EvalRecord(StageRecord):
    inputs: dict = {}  # models, reference, reference_logps, text_corpus, training_log
    outputs: EvalOutputs
    config: dict = {}
    summary: dict = {}  # annealed_minus_merged_preference_accuracy


# The scalar metrics every model has in the eval report (reward_* for merged and annealed), in the report's order.
SCALAR_METRICS = (
    "preference_accuracy",
    "preference_accuracy_normalized",
    "reward_accuracy",
    "reward_margin",
    "kl_to_reference",
    "perplexity",
    "perplexity_heldout_chosen",
)


class ModelMetrics(BaseModel):
    """One model's held-out metrics in the eval report, each with its 95% interval in `ci95` (same keys)."""

    model_config = ConfigDict(extra="forbid")

    preference_accuracy: float
    preference_accuracy_normalized: float
    kl_to_reference: float
    perplexity: float
    perplexity_heldout_chosen: float
    reward_accuracy: float | None = None  # merged and annealed only: against the stored reference log-probs
    reward_margin: float | None = None
    benchmarks: dict[str, float] = {}  # lm-eval task -> score on the suite's items
    retention: dict[str, float | None] | None = None  # merged and annealed: each parent's skills kept, and the worst
    ci95: dict[str, Any]

    def value(self, metric: str):
        """`metric`, or one entry of a group as `benchmarks/<task>` or `retention/<parent or worst>`; None where this
        model has none."""
        group, _, key = metric.partition("/")
        value = getattr(self, group) if group in type(self).model_fields else None
        if key:
            return value.get(key) if isinstance(value, dict) else None
        return value

    def interval(self, metric: str) -> list[float] | None:
        """The 95% interval of `value(metric)`."""
        group, _, key = metric.partition("/")
        found = self.ci95.get(group)
        return found.get(key) if key and isinstance(found, dict) else None if key else found

    def scalars(self) -> dict[str, float]:
        """Every scalar metric, then each benchmark as `benchmarks/<task>`, in the report's order."""
        out = {k: v for k, v in self.model_dump().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {**out, **{f"benchmarks/{task}": v for task, v in self.benchmarks.items()}}


class EvalReport(BaseModel):
    """`eval/metrics.json`: every model's metrics, annealed minus merged (paired), generation health, the benchmarks,
    the win rates, the contamination audit, the verdict, and how they were computed."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelMetrics]
    comparison: dict[str, dict[str, Any]]  # annealed_vs_merged: metric -> {delta, ci95[, ratio, ratio_ci95]}
    heldout_pairs: int
    reference: dict[str, Any]  # anneal (its label), kl_to, and with anneal.reference=parents the parents
    perplexity_on: str
    beta: float
    bootstrap: dict[str, Any]  # resamples, seed, confidence
    generation: dict[str, Any]
    scoring_seconds: float
    benchmarks: dict[str, Any] | None = None  # tasks, parent_tasks, merged_vs_parents, unmatched (stages/eval)
    win_rate: dict[str, Any] | None = None  # reward, vs: opponent -> win rates, reward_accuracy, ...
    contamination: dict[str, Any] = {}
    verdict: dict[str, Any] = {}  # capabilities, answers, ship, sentence
    extrapolation: dict[str, Any] | None = None  # anneal.extrapolate: alphas (validation accuracy), chosen, pairs

    @property
    def annealed_vs_merged(self) -> dict[str, Any]:
        return self.comparison["annealed_vs_merged"]

    def delta(self, metric: str) -> dict | None:
        """Annealed minus merged for `metric` (or `benchmarks/<task>`): {delta, ci95, ...}; None if absent."""
        group, _, key = metric.partition("/")
        value = self.annealed_vs_merged.get(group)
        return value.get(key) if key and isinstance(value, dict) else None if key else value

    def lookup(self, path: str):
        """What a dotted path names: `<model>.<metric>[.<key>]` (model merged, annealed or parent:<name>; e.g.
        annealed.retention.worst, annealed.benchmarks.arc_easy), or a path from the report's root
        (comparison.annealed_vs_merged.preference_accuracy.delta, win_rate.vs.merged.length_controlled,
        verdict.ship); None where nothing is."""
        model = next((m for m in self.models if path.startswith(f"{m}.")), None)
        node = self.models[model].model_dump() if model else self.model_dump()
        for part in (path[len(model) + 1 :] if model else path).split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2, exclude_unset=True) + "\n")


def read_report(path: str | Path) -> EvalReport:
    """An eval report, as eval wrote it."""
    return EvalReport.model_validate_json(Path(path).read_text())


class ReleaseOutputs(Record):
    model: str
    card: str
    files: list[str]


class ReleaseRecord(StageRecord):
    inputs: dict = {}  # model, merged, annealed, metrics, mergekit_config
    outputs: ReleaseOutputs
    config: dict = {}
    pick: dict = {}  # choice, picked, reason (and with best: objective, values)
    commands: list[str] = []  # the commands that reproduce the release
    hub: dict | None = optional()  # release=hub: repo_id, revision, commit, ...


RECORDS = {"merge": MergeRecord, "anneal": AnnealRecord, "eval": EvalRecord, "release": ReleaseRecord}
R = TypeVar("R", bound=StageRecord)


def load(run_dir: Path, kind: type[R]) -> R:
    """A completed stage's record from `run_dir`'s manifest (a clear error when it has not completed)."""
    stage = next(name for name, cls in RECORDS.items() if cls is kind)
    entry = manifest.load(run_dir)["stages"].get(stage)
    if not entry or entry.get("status") != "done":
        raise UserError(
            f"Stage '{stage}' has no completed output in {run_dir}. Fix: run it first, e.g. "
            f"pipeline.stages=[{stage},...], in the same run folder (hydra.run.dir={run_dir})."
        )
    return kind.model_validate(entry)


def completed(stages: dict) -> dict[str, StageRecord]:
    """The records of a manifest's completed stages, by stage name."""
    return {
        name: RECORDS[name].model_validate(entry)
        for name, entry in stages.items()
        if name in RECORDS and entry.get("status") == "done"
    }
