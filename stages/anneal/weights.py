"""How the anneal stage loads and saves weights: straight into the dtypes they train in (float32 master weights;
LoRA's frozen Linear weights in bf16 under autocast; QLoRA's base in 4 bits), and saved as safetensors with the
tokenizer. (Models that only score, in the gate and in eval, load through pipeline/scoring.py.)
"""

from pathlib import Path

from pipeline import UserError, models
from pipeline.artifacts import publish


def load_causal_lm(folder: str | Path, linear_weights: str = "float32"):
    """A causal LM with float32 weights, except its Linear weights in `linear_weights` ("bfloat16": frozen weights
    that bf16 autocast only ever uses through their bf16 cast). Loaded straight into those dtypes, on the CPU: a
    bf16 checkpoint is read as bf16 and only the rest upcast (exact, no float32 copy of the Linear weights ever
    exists); a float32 one is read as float32 and its Linear weights cast. Either way, the numbers a float32 load
    followed by the cast would give; the device sees only the final dtypes."""
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = linear_weights == "bfloat16"
    direct = bf16 and models.stored_dtype(folder) == "BF16"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if direct else torch.float32)
    if direct:
        linears = {m for m in model.modules() if isinstance(m, torch.nn.Linear)}
        for module in model.modules():
            if module not in linears:
                for param in module.parameters(recurse=False):
                    param.data = param.data.float()
                for name, buffer in module.named_buffers(recurse=False):
                    if buffer.is_floating_point():
                        setattr(module, name, buffer.float())
    elif bf16:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(torch.bfloat16)
    return model


def check_quantization(anneal) -> None:
    """anneal=qlora runs where bitsandbytes' 4-bit kernels do: refused early, with the fix, anywhere else."""
    import importlib.util

    import torch

    if not anneal.quantization:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "anneal=qlora quantizes the merged model to 4 bits with bitsandbytes, which is not installed. "
            "Fix: pip install 'merge-anneal[qlora]' on a CUDA machine, or anneal=lora."
        )
    if not torch.cuda.is_available():
        raise UserError(
            "anneal=qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels) and this machine has none. Fix: "
            "anneal=lora here (its frozen base in bf16 where autocast pays), or run on a GPU."
        )


def load_policy(merged_dir: Path, anneal, frozen_linear_weights: str, device_index: int = 0):
    """The model DPO trains, loaded straight into the dtypes it trains in: float32 master weights; LoRA's frozen
    Linear weights in bf16 under autocast (`load_causal_lm`); QLoRA's base in 4 bits on this process's GPU
    (TRL adds the adapter)."""
    if not anneal.quantization:
        return load_causal_lm(merged_dir, frozen_linear_weights)
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    fields = dict(anneal.quantization)
    fields["bnb_4bit_compute_dtype"] = getattr(torch, fields.get("bnb_4bit_compute_dtype", "bfloat16"))
    return AutoModelForCausalLM.from_pretrained(
        merged_dir,
        quantization_config=BitsAndBytesConfig(**fields),
        dtype=torch.bfloat16,
        device_map={"": device_index},
    )


def merge_adapter(merged_dir: Path, adapter_dir: Path):
    """The merged model in float32, read back from disk, with the trained LoRA adapter merged in."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def save_model(model, tokenizer, out_dir: Path, state_dict=None) -> None:
    """safetensors + tokenizer + chat template (`state_dict`: the gathered weights of a sharded model)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    publish(out_dir, write)
