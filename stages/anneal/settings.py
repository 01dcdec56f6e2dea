"""The anneal stage's settings: the `anneal` block (conf/anneal/) and the merge gate's `pipeline.merge_check`.

`trainer` holds TRL's DPOConfig fields and `method_args` CPOConfig / ORPOConfig's, names unchanged: TRL's own
classes validate them (stages/anneal/training.py); `peft` is PEFT's LoraConfig, `quantization` transformers'
BitsAndBytesConfig.
"""

from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from pipeline.settings import Settings


class MergeCheck(Settings):
    """`pipeline.merge_check`: the perplexity gate before the anneal (stages/anneal/gate.py)."""

    texts: NonNegativeInt
    max_perplexity_ratio: PositiveFloat | None


class PerfSwitches(Settings):
    """`anneal.perf`: the speed and memory switches (stages/anneal/perf.py)."""

    lean_saved_tensors: bool
    float32_attention: bool
    frozen_weights_bf16: bool
    reference_weights_bf16: bool
    reference_pass_tokens: PositiveInt | None
    pack_rows: bool
    malloc_keeps_freed_memory: bool
    gc_skips_existing_objects: bool
    fingerprint_in_background: bool
    skip_trl_model_hash: bool


class AnnealSettings(Settings):
    """`anneal` (conf/anneal/dpo.yaml documents every key)."""

    reference: str | int | None = "auto"
    method: Literal["dpo", "cpo", "orpo"]
    method_args: dict[str, Any] = {}
    reference_combine: Literal["mean", "max", "route"]
    reference_route: str
    peft: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    perf: PerfSwitches
    memory_check: bool
    trainer: dict[str, Any]
    extrapolate: list[PositiveFloat] | None = None
    extrapolate_validation: float = Field(0.05, gt=0, lt=0.5)

    @property
    def mode(self) -> str:
        """full (every weight trains), lora, or qlora (LoRA on a 4-bit base)."""
        return "qlora" if self.quantization else "full" if self.peft is None else "lora"
