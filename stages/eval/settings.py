"""The eval stage's settings: the `eval` block (conf/eval/default.yaml documents every key)."""

from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from pipeline.settings import Settings


class Sampling(Settings):
    """`eval.generation`: the seeded sampled generations of generation health."""

    prompts: PositiveInt | None
    temperature: PositiveFloat
    top_p: float = Field(gt=0, le=1)
    seed: int


class EvalSettings(Settings):
    batch_size: PositiveInt
    bootstrap_resamples: PositiveInt
    seed: int
    max_new_tokens: NonNegativeInt
    parent_skills: Literal["auto"] | dict[str, str] | None
    generation: Sampling
    samples: NonNegativeInt
    text_corpus: str | None
    lm_eval: dict[str, Any] | None
