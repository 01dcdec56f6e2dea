"""The eval stage's settings: the `eval` block (conf/eval/default.yaml and conf/eval/benchmarks/ document every key)."""

from typing import Any

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from pipeline.settings import Settings


class Sampling(Settings):
    """`eval.generation`: the seeded sampled generations of generation health and of the win rate."""

    prompts: PositiveInt | None
    temperature: PositiveFloat
    top_p: float = Field(gt=0, le=1)
    seed: int


class Benchmarks(Settings):
    """`eval.benchmarks`: lm-evaluation-harness tasks every model answers, paired (conf/eval/benchmarks/)."""

    tasks: list[str] = []
    include_path: str | None = None  # a folder of task YAMLs (lm-eval's include_path)
    items: PositiveInt | None = None  # documents per task, a seeded sample; null: all
    num_fewshot: NonNegativeInt | None = None
    batch_size: PositiveInt | None = None  # null: eval.batch_size
    parent_tasks: dict[str, list[str]] | None = None  # parent folder name -> its own tasks; null: the best parent's
    metadata: dict[str, Any] = {}  # handed to the tasks (lm-eval's TaskManager metadata), e.g. the demo's data file


class WinRate(Settings):
    """`eval.win_rate`: the annealed model's answers against the merged model's and each parent's, by a reward."""

    reward: str | None = None  # a sequence-classification reward model (hub id or folder), or module:function
    batch_size: PositiveInt = 8
    length_matched: float = Field(default=0.1, ge=0)  # lengths within this share of each other count as matched


class Verdict(Settings):
    """`eval.verdict`: when capabilities count as kept."""

    retention_threshold: float = Field(default=0.95, gt=0)


class EvalSettings(Settings):
    batch_size: PositiveInt
    bootstrap_resamples: PositiveInt
    seed: int
    max_new_tokens: NonNegativeInt
    generation: Sampling
    samples: NonNegativeInt
    text_corpus: str | None
    benchmarks: Benchmarks
    win_rate: WinRate
    verdict: Verdict
