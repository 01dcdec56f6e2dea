"""A memory plan for the anneal stage: bytes per device for a DPO step, estimated before any model is loaded.

Estimates, not measurements. Per device, for `n` parameters, `t` trainable (LoRA) parameters and `p` processes:
- weights: full 4n (float32 masters); lora 2n under bf16 autocast (frozen weights in bf16) else 4n, plus 4t;
  qlora 0.5625 B per layer Linear weight (NF4 with double quantization; bitsandbytes leaves embeddings and
  lm_head in the compute dtype: 2 B, 4 B without autocast), plus 4t.
- gradients: 4 B per trainable parameter; DDP (sharding none, p > 1) adds its buckets, one more copy.
- optimizer: AdamW 8 B per trainable parameter (two float32 states); optimizers with "8bit" in their name
  (adamw_bnb_8bit, paged_adamw_8bit, ...) 2 B. Paged states are counted as resident.
- fsdp2 / zero3: weights, gradients and optimizer divided by p, plus one layer's Linear weights gathered in the
  compute dtype (2 B under autocast, else 4 B).
- activations, after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv:2205.05198, eq. 1, no tensor or sequence parallelism; derived for a GPT layer, a rough fit for Llama's):
  per token per layer 34*h bytes in 16-bit, plus 5*a*s attention-score bytes only with eager attention (SDPA
  and flash attention keep no scores); with activation checkpointing (the paper's full recomputation) 2*h per
  token per layer (each layer's input) plus one layer's full activations while it is recomputed.
  DPO runs chosen and rejected, so 2*batch_size*max_length tokens. Logits: tokens * vocab * 4 B (float32) * 2
  (log_softmax). Without autocast the 16-bit figures double. The reference model is not counted: the stage
  scores every pair with it before training and releases it.
"""

from dataclasses import asdict, dataclass, field

from pipeline import UserError

GIB = 2**30
HEADROOM = 0.9  # a plan fits in 90 % of the device: the rest for the CUDA context, allocator slack, temporaries
QUANTIZED_BYTES = 0.5625  # NF4 (0.5 B) + double-quantized constants per parameter
QUANTITIES = ("weights", "gradients", "optimizer", "activations", "total", "available")


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cuda" or "cpu"
    processes: int  # processes (= devices) the training runs on
    sharding: str  # "none" (DDP or single process), "fsdp2" or "zero3"
    weights: int  # bytes per device, here and below
    gradients: int
    optimizer: int
    activations: int
    total: int
    available: int | None  # None: unknown
    inputs: dict = field(default_factory=dict, repr=False, compare=False)  # plan()'s arguments, for check's fixes

    def fits(self) -> bool:
        return self.available is None or self.total <= self.available * HEADROOM

    def record(self) -> dict:
        record = {name: value for name, value in asdict(self).items() if name != "inputs"}
        record["GiB"] = {name: None if record[name] is None else round(record[name] / GIB, 2) for name in QUANTITIES}
        record.update(
            fits=self.fits(), headroom=HEADROOM, settings={k: v for k, v in self.inputs.items() if k != "model_config"}
        )
        return record

    def replanned(self, **changes) -> "MemoryPlan":
        """The plan with some of plan()'s arguments changed."""
        return plan(**{**self.inputs, **changes})

    def describe(self) -> str:
        setup = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        setup += f", {self.sharding}" if self.sharding != "none" else (", DDP" if self.processes > 1 else "")
        parts = " + ".join(f"{name} {getattr(self, name) / GIB:.1f} GiB" for name in QUANTITIES[:4])
        parts += f" = {self.total / GIB:.1f} GiB"
        available = "unknown memory" if self.available is None else f"{self.available / GIB:.1f} GiB"
        return f"memory plan per {self.device} device ({setup}): {parts} of {available} available"


def _layer_linears(model_config: dict) -> list[tuple[int, int]]:
    """(in, out) features of one Llama-shaped layer's Linear modules: q, k, v, o, gate, up, down."""
    h, i = model_config["hidden_size"], model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or h // heads
    return [
        (h, heads * head_dim),
        (h, kv_heads * head_dim),
        (h, kv_heads * head_dim),
        (heads * head_dim, h),
        (h, i),
        (h, i),
        (i, h),
    ]


def lora_parameters(model_config: dict, r: int) -> int:
    """Trainable parameters of a rank-`r` LoRA on every Linear of every layer (peft's all-linear: not lm_head)."""
    return model_config["num_hidden_layers"] * sum(r * (n_in + n_out) for n_in, n_out in _layer_linears(model_config))


def plan(
    model_config: dict,
    n_params: int,
    *,
    mode: str,
    autocast: bool,
    batch_size: int,
    max_length: int,
    activation_checkpointing: bool,
    processes: int = 1,
    sharding: str = "none",
    lora_r: int | None = None,
    optim: str = "adamw_torch",
    device: str = "cpu",
    available: int | None = None,
) -> MemoryPlan:
    """Bytes per device for DPO training with these settings (the formulas: this module's docstring)."""
    if mode not in ("full", "lora", "qlora") or sharding not in ("none", "fsdp2", "zero3"):
        raise ValueError(f"unknown mode {mode!r} or sharding {sharding!r}")
    if mode != "full" and lora_r is None:
        raise ValueError(f"mode {mode!r} needs lora_r")
    inputs = dict(locals())
    compute_bytes = 2 if autocast else 4
    layers, h = model_config["num_hidden_layers"], model_config["hidden_size"]
    layer_weights = sum(n_in * n_out for n_in, n_out in _layer_linears(model_config))
    trainable = n_params if mode == "full" else lora_parameters(model_config, lora_r)
    if mode == "full":
        weights = 4 * n_params
    elif mode == "lora":
        weights = compute_bytes * n_params + 4 * trainable
    else:
        quantized = layers * layer_weights
        weights = int(QUANTIZED_BYTES * quantized) + compute_bytes * (n_params - quantized) + 4 * trainable
    gradients = 4 * trainable * (2 if sharding == "none" and processes > 1 else 1)
    optimizer = (2 if "8bit" in optim else 8) * trainable
    if sharding != "none":
        weights = weights // processes + compute_bytes * layer_weights
        gradients, optimizer = gradients // processes, optimizer // processes

    tokens = 2 * batch_size * max_length
    scores = (
        5 * model_config["num_attention_heads"] * max_length
        if model_config.get("_attn_implementation", model_config.get("attn_implementation")) == "eager"
        else 0
    )
    per_layer = 34 * h + scores  # 16-bit bytes per token
    per_token = 2 * h * layers + per_layer if activation_checkpointing else per_layer * layers
    activations = tokens * per_token * (compute_bytes // 2) + tokens * model_config["vocab_size"] * 4 * 2
    total = weights + gradients + optimizer + activations
    return MemoryPlan(device, processes, sharding, weights, gradients, optimizer, activations, total, available, inputs)


def available_memory(device: str) -> int | None:
    """Bytes per device: CUDA's total memory (the smallest visible device), or the CPU's MemAvailable (the whole
    machine's: processes on one machine share it). None when unknown."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        return min(torch.cuda.mem_get_info(index)[1] for index in range(torch.cuda.device_count()))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check(plan: MemoryPlan) -> None:
    """Raise UserError, naming the fixes that apply (largest effect first), when the plan does not fit."""
    if plan.fits():
        return
    inputs, replan = plan.inputs, plan.replanned
    fixes = []  # (total after the fix, override)
    if inputs["mode"] == "full":
        fixes.append((replan(mode="lora", lora_r=16).total, "`anneal=lora`"))  # r: conf/anneal/lora.yaml's
    if inputs["mode"] != "qlora":
        fixes.append((replan(mode="qlora", lora_r=inputs["lora_r"] or 16).total, "`anneal=qlora`"))
    for n in range(max(2, inputs["processes"] + (inputs["sharding"] != "none")), 65):
        if (sharded := replan(sharding="fsdp2", processes=n)).fits():
            fixes.append((sharded.total, f"`distributed=fsdp2 distributed.num_processes={n}`"))
            break
    if not inputs["activation_checkpointing"]:
        fixes.append((replan(activation_checkpointing=True).total, "`anneal.trainer.activation_checkpointing=true`"))
    if (batch := inputs["batch_size"]) > 1:
        fixes.append(
            (
                replan(batch_size=batch // 2).total,
                f"`anneal.trainer.per_device_train_batch_size={batch // 2}`"
                " with `anneal.trainer.gradient_accumulation_steps` doubled",
            )
        )
    if (length := inputs["max_length"]) > 1:
        fixes.append((replan(max_length=length // 2).total, f"a shorter `anneal.trainer.max_length={length // 2}`"))
    listed = "; ".join(f"{override} ({total / GIB:.1f} GiB)" for total, override in sorted(fixes))
    raise UserError(
        f"The anneal stage would not fit in memory: {plan.describe()}, more than {HEADROOM:.0%} of "
        f"it. Fixes, largest effect first (each alone, its plan's total): {listed}. To skip this check: "
        "`anneal.memory_check=false`."
    )


def for_anneal(anneal, sharding: str, merged_dir, args, precision, n_params: int) -> MemoryPlan | None:
    """The anneal stage's plan from its settings (`anneal`: AnnealSettings), its sharding (none, fsdp2, zero3), its
    DPOConfig (`args`) and the merged model's config.json (None for an architecture without Llama-style fields)."""
    import json
    import os
    from pathlib import Path

    import torch

    model_config = json.loads((Path(merged_dir) / "config.json").read_text())
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    available = available_memory(device)
    if device == "cpu" and available:  # the processes of one machine share its memory
        available //= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    try:
        return plan(
            model_config,
            n_params,
            mode=anneal.mode,
            autocast=precision.autocast is not None,
            batch_size=args.per_device_train_batch_size,
            max_length=args.max_length or model_config.get("max_position_embeddings", 4096),
            activation_checkpointing=bool(args.activation_checkpointing),
            processes=args.world_size,
            sharding=sharding,
            lora_r=None if anneal.peft is None else anneal.peft["r"],
            optim=str(args.optim),
            device=device,
            available=available,
        )
    except KeyError:
        return None
