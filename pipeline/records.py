"""Typed stage records: what one stage hands to the next, read from and written to `manifest.json`.

Each stage returns a record; the app stores it as the stage's manifest entry (the JSON keeps the shape users
know: `inputs`, `outputs`, `config`, ...). Later stages, the release and the sweep summary read earlier stages
through these classes (`load(run_dir, MergeRecord)`), so a renamed field fails validation in one place
instead of a string path failing in another stage at run time. Unknown keys are kept, so older manifests and
extra diagnostics (timings, cache states) pass through unchanged.
"""

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from pipeline import UserError, manifest


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")


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
    merge's folder, by name (kept as an extra key, so a single merge's entry keeps its shape)."""

    model: str
    config: str


class MergeConfig(Record):
    merge: dict  # the resolved mergekit configuration (MergeConfiguration.model_dump)
    merge_options: dict
    models: dict | None = None  # the `models` group, where a method preset read it (not for merge.config_file)


class MergeStep(Record):
    """One merge of a mergekit-multi chain, in the order they ran (the final merge last, without a name)."""

    name: str | None
    merge_method: str
    model: str          # its output folder
    models: list[str]   # the models it read (earlier merges of the chain among them)
    cache: dict


class MergeRecord(StageRecord):
    inputs: MergeInputs  # for a chain: the models it starts from (no intermediate)
    outputs: MergeOutputs
    config: MergeConfig  # for a chain: the final merge's
    merge_method: str    # `moe` for a mixture of experts (mergekit-moe)
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
    answer_key: str | None = None      # `module.function`: (skill, exact answer) of a prompt, or None
    heldout_text: str | None = None    # a held-out text corpus that comes with the data


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
    precision: dict
    data: dict  # pair counts: train_pairs, heldout_pairs, dropped
    cache: dict

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
    outputs: EvalOutputs


class ReleaseOutputs(Record):
    model: str
    card: str
    files: list[str]


class ReleaseRecord(StageRecord):
    outputs: ReleaseOutputs


RECORDS = {"merge": MergeRecord, "anneal": AnnealRecord, "eval": EvalRecord, "release": ReleaseRecord}
R = TypeVar("R", bound=StageRecord)


def load(run_dir: Path, kind: type[R]) -> R:
    """A completed stage's record from `run_dir`'s manifest (a clear error when it has not completed)."""
    stage = next(name for name, cls in RECORDS.items() if cls is kind)
    entry = manifest.load(run_dir)["stages"].get(stage)
    if not entry or entry.get("status") != "done":
        raise UserError(f"Stage '{stage}' has no completed output in {run_dir}. Fix: run it first, e.g. "
                        f"pipeline.stages=[{stage},...], in the same run folder (hydra.run.dir={run_dir}).")
    return kind.model_validate(entry)


def completed(stages: dict) -> dict[str, StageRecord]:
    """The records of a manifest's completed stages, by stage name."""
    return {name: RECORDS[name].model_validate(entry) for name, entry in stages.items()
            if name in RECORDS and entry.get("status") == "done"}
