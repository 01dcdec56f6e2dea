"""Stage 2, anneal: TRL DPO on the merged model, with an unmerged parent as the reference policy.

TRL's defaults would silently make the merged model its own reference and keep a second model resident.
Here the reference (by default the merge's base model, else its first parent) scores every training and
held-out pair once, in one batched no-grad pass through TRL's own tokenisation and log-prob code; the
result is stored as parquet (`prompt, chosen, rejected, ref_chosen_logps, ref_rejected_logps`) in a cache
shared across runs, the reference is released, and only then does the policy train, reading the stored
log-probs. Output: `<run_dir>/anneal/model/` (merged weights for LoRA), `metrics.jsonl`, the parquet.
"""

import hashlib
import json
import shutil
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, manifest, models, preferences
from pipeline.artifacts import replace_dir, through_cache

# TRL 1.16's DPO loss types (dpo_trainer.py, `_compute_loss`).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# DPOConfig fields the stage owns: where things are written, and the precomputed reference.
OWNED_FIELDS = {"output_dir", "precompute_ref_log_probs"}
REFERENCE_PASS_TOKENS = 4096  # tokens per forward of the reference pass (see reference_batch_size)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Anneal the merged model; returns the manifest entry."""
    clock = PhaseClock()
    run_dir = Path(run_dir)
    stage_dir = run_dir / "anneal"
    merged_dir = manifest.stage_output(run_dir, "merge", "model")
    merge_entry = manifest.load(run_dir)["stages"]["merge"]
    reference, reference_label = choose_reference(cfg.anneal.reference, merge_entry, merged_dir)
    reference_dir = models.resolve(reference)
    with ThreadPoolExecutor(1) as pool:  # hashing the reference's weights releases the GIL: it overlaps the imports
        hashing = pool.submit(models.fingerprint, reference_dir)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOTrainer  # noqa: F401  (imported before garbage collection skips the libraries' objects)

        reference_fingerprint = hashing.result()
    clock.lap("imports_and_fingerprint")
    freed_memory_kept = models.keep_freed_memory()
    with models.gc_skips_existing_objects() as gc_skipped:
        stage_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        models.check_same_vocabulary(
            tokenizer, merged_dir, reference_dir, "The reference model",
            "use a parent with the same tokenizer (anneal.reference=auto or a parent name), or merge without changing "
            "the vocabulary.")
        args = dpo_config(cfg.anneal, stage_dir / "checkpoints", models.count_parameters(merged_dir))
        pairs, dropped = preferences.load_preferences(cfg.data)

        clock.lap("setup")
        store_path, cache_state = reference_logps(reference_dir, reference_fingerprint, tokenizer, pairs, args, cfg,
                                                  stage_dir)
        clock.lap("reference_logps")
        scored = preferences.read_store(store_path)
        for split in scored:  # TRL drops pairs whose prompt alone fills max_length: counted, never silent
            dropped[split]["prompt_too_long"] = len(pairs[split]) - len(scored[split])
            if len(scored[split]) == 0:
                raise UserError(f"Every {split} prompt fills anneal.trainer.max_length={args.max_length} tokens, so "
                                "no pair is left to train on. Fix: raise anneal.trainer.max_length.")
        print(f"anneal: {len(scored['train'])} train / {len(scored['heldout'])} held-out pairs; dropped {dropped}; "
              f"reference {reference_label} ({reference}); reference log-probs: cache {cache_state}")

        checkpoint = last_checkpoint(args.output_dir) if cfg.pipeline.resume else None
        if checkpoint is None:  # a fresh start: no stale checkpoints or metrics from an earlier attempt
            shutil.rmtree(args.output_dir, ignore_errors=True)
            (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)  # fp32 master weights
        trainer = make_trainer(model, tokenizer, args, scored["train"], cfg.anneal, stage_dir, reference_fingerprint)
        with (frozen_base_in_bf16(trainer.model, bool(args.bf16) and cfg.anneal.peft is not None) as frozen_bf16,
              float32_attention(model, bool(args.bf16) and not _cuda() and cfg.anneal.peft is None) as attention_fp32,
              lean_saved_tensors(trainer, autocast=bool(args.bf16)) as lean):
            clock.lap("setup")
            trainer.train(resume_from_checkpoint=checkpoint)
        clock.lap("train")
        final = dict(trainer.state.log_history[-1]) if trainer.state.log_history else {}

        out_dir, adapter_dir = stage_dir / "model", stage_dir / "adapter"
        if cfg.anneal.peft is None:
            save_model(trainer.model, tokenizer, out_dir)
        else:  # the adapter on its own, then merged into the float32 merged weights read back from disk
            replace_dir(adapter_dir, trainer.model.save_pretrained)  # PEFT format, safetensors
        del trainer, model
        models.release_memory()
        if cfg.anneal.peft is not None:
            save_model(merge_adapter(merged_dir, adapter_dir), tokenizer, out_dir)
        clock.lap("save")
        return {
            "inputs": {"model": str(merged_dir),
                       "reference": reference if models.is_hub_id(reference) else reference_dir,
                       "reference_path": reference_dir, "reference_label": reference_label,
                       "data": preferences.sources(cfg.data)},
            "outputs": {"model": str(out_dir), "reference_logps": str(store_path),
                        "metrics": str(stage_dir / "metrics.jsonl"),
                        **({"adapter": str(adapter_dir)} if cfg.anneal.peft is not None else {})},
            "reference_fingerprint": reference_fingerprint,
            "config": {"anneal": OmegaConf.to_container(cfg.anneal, resolve=True),
                       "data": OmegaConf.to_container(cfg.data, resolve=True)},
            "precision": {"master_weights": "float32", "autocast": "bfloat16" if args.bf16 else None,
                          "frozen_linear_weights": "bfloat16" if frozen_bf16 else "float32",
                          "attention": "float32" if attention_fp32 or not args.bf16 else "bfloat16",
                          "autocast_weight_cache": False if args.bf16 else None,
                          "reference_linear_weights": "bfloat16" if args.bf16 else "float32"},
            "process": {"malloc_keeps_freed_memory": freed_memory_kept, "gc_skipped_objects": gc_skipped},
            "saved_for_backward": dict(lean.counts),  # what LeanSavedTensors stored leaner, summed over training
            "data": {"train_pairs": len(scored["train"]), "heldout_pairs": len(scored["heldout"]), "dropped": dropped},
            "cache": {"reference_logps": cache_state},
            "reference_batch_size": args.precompute_ref_batch_size,
            "resumed_from": checkpoint,
            "final_log": final,
            "seconds_by_phase": clock.seconds,
        }


class PhaseClock:
    """Wall seconds by phase (a phase named twice adds up), for the manifest."""

    def __init__(self):
        self.seconds, self._last = {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now


def choose_reference(choice, merge_entry: dict, merged_dir: Path) -> tuple[str, str]:
    """The reference policy: `auto` (merge base model, else first parent), a parent name or index,
    `merged` (only when asked for by name), or any folder / hub id."""
    parents = merge_entry["inputs"]["parents"]
    base = merge_entry["inputs"]["base_model"]
    choice = "auto" if choice is None else str(choice)
    if choice == "auto":
        return (base, "base_model") if base else (parents[0], "parent:0")
    if choice == "merged":
        return str(merged_dir), "merged"
    if choice.isdigit():
        index = int(choice)
        if index >= len(parents):
            raise UserError(f"anneal.reference={index} but the merge has {len(parents)} parents. Fix: use an index "
                            f"below {len(parents)}, a parent name ({', '.join(Path(p).name for p in parents)}), "
                            "auto, merged, or a model folder.")
        return parents[index], f"parent:{index}"
    by_name = {Path(p).name: p for p in [*parents, *([base] if base else [])]}
    if choice in by_name:
        return by_name[choice], f"parent:{choice}"
    return choice, "explicit"


def dpo_config(anneal: DictConfig, output_dir: Path, n_params: int):
    """TRL's own DPOConfig from `anneal.trainer` (field names unchanged), plus the fields the stage owns."""
    from trl import DPOConfig

    fields = OmegaConf.to_container(anneal.trainer, resolve=True)
    if fields.get("bf16") == "auto":
        fields["bf16"] = bf16_autocast(n_params)
    if fields.get("bf16") and not _cuda():
        fields.setdefault("use_cpu", True)  # transformers refuses bf16 on CPU unless told it is meant
    owned = sorted(set(fields) & OWNED_FIELDS)
    if owned:
        raise UserError(f"anneal.trainer.{owned[0]} is set by merge-anneal. Fix: remove it.")
    try:
        args = DPOConfig(output_dir=str(output_dir), precompute_ref_log_probs=True, **fields)
    except (TypeError, ValueError) as err:
        raise UserError(f"TRL's DPOConfig rejected anneal.trainer: {err}. Fix: use DPOConfig field names and "
                        "values (conf/anneal/dpo.yaml lists the common ones).") from None
    unknown = [name for name in args.loss_type if name not in LOSS_TYPES]
    if unknown:
        raise UserError(f"Unknown DPO loss type(s) {unknown}. Fix: use TRL's loss types: {', '.join(LOSS_TYPES)}, "
                        "e.g. anneal.trainer.loss_type=[sigmoid].")
    if args.precompute_ref_batch_size is None:
        args.precompute_ref_batch_size = reference_batch_size(args.per_device_train_batch_size, args.max_length)
    if args.beta <= 0:
        raise UserError(f"anneal.trainer.beta must be positive (got {args.beta}): it scales the implicit "
                        "reward. Fix: e.g. anneal.trainer.beta=0.1.")
    return args


def reference_batch_size(train_batch_size: int, max_length: int | None) -> int:
    """Pairs per no-grad forward of the reference pass, when `precompute_ref_batch_size` is unset: enough for
    about 4096 tokens (a pair is up to 2 x max_length), at least the training batch. With no activations kept
    and TRL's tiled log-prob head this costs little memory; small models run faster per token (the demo's:
    1.6x at 4096 tokens per forward against 512, 2 CPU cores; at 94.5M parameters no difference measured)."""
    return max(train_batch_size, REFERENCE_PASS_TOKENS // (2 * (max_length or 1024)))


def bf16_autocast(n_params: int) -> bool:
    """`bf16: auto`: bf16 autocast where it pays: a CUDA GPU with bf16, or a CPU with bf16 matrix instructions
    (AMX / AVX512-BF16) and a model big enough to be compute-bound (measured: 2.4x per DPO step at 100M
    parameters on this project's CPUs; tiny models are overhead-bound and gain nothing)."""
    if _cuda():
        import torch

        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return n_params >= 30_000_000 and ("amx_bf16" in flags or "avx512_bf16" in flags)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def reference_logps(reference_dir: str, reference_fingerprint: str, tokenizer, pairs, args, cfg: DictConfig,
                    stage_dir: Path):
    """Score every pair with the reference once; cached by (reference weights, tokenizer, data, lengths)."""
    local = stage_dir / "reference_logps"

    def compute(tmp: Path) -> None:
        scored = score_with_reference(reference_dir, tokenizer, pairs, args, reference_fingerprint)
        tmp.mkdir(parents=True)
        preferences.write_store(scored, tmp / "data.parquet")

    if not cfg.pipeline.cache:
        replace_dir(local, compute)
        return local / "data.parquet", "miss"
    key = hashlib.sha256(json.dumps({
        "reference": reference_fingerprint,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "data_rows": {split: preferences.rows_fingerprint(pairs[split]) for split in pairs},
        "max_length": args.max_length, "truncation_mode": args.truncation_mode, "ld_alpha": args.ld_alpha,
        "autocast": bool(args.bf16), "trl": version("trl"),
    }, sort_keys=True).encode()).hexdigest()[:32]
    cached = Path(cfg.pipeline.cache_dir).expanduser() / "reference_logps" / key
    state = through_cache(cached, lambda entry: replace_dir(entry, compute), local)
    return local / "data.parquet", state


def score_with_reference(reference_dir: str, tokenizer, pairs, args, reference_fingerprint: str):
    """One batched no-grad pass of the reference through TRL's own precompute (tokenisation, masks,
    log-probs), over the train and held-out pairs. The reference is freed before this returns."""
    import datasets
    import torch
    from datasets import DatasetDict
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).requires_grad_(False)
    if args.bf16:  # autocast would cast each Linear weight to bf16 at every forward: cast once, same numbers
        frozen_linears_to_bf16(reference)
    indexed = {split: ds.add_column("row", list(range(len(ds)))) for split, ds in pairs.items()}
    caching = datasets.is_caching_enabled()
    datasets.disable_caching()  # TRL's own precompute cache would outlive pipeline.cache=false; ours is the cache
    try:
        with known_model_hash(reference_fingerprint):
            trainer = DPOTrainer(model=reference, args=args, train_dataset=indexed["train"],
                                 eval_dataset=indexed["heldout"], processing_class=tokenizer)
    finally:
        if caching:
            datasets.enable_caching()
    scored = DatasetDict({
        "train": _attach(pairs["train"], trainer.train_dataset),
        "heldout": _attach(pairs["heldout"], trainer.eval_dataset),
    })
    del trainer, reference
    models.release_memory()  # the reference is gone before the policy is loaded
    return scored


def _attach(original, scored):
    """Original rows (untouched text) with the reference log-probs, matched by row index; rows TRL dropped
    (prompt alone fills max_length) are left out."""
    column = lambda name: scored[name][:]  # a list at once (iterating a datasets Column goes row by row)
    kept = original.select(column("row"))
    return (kept.add_column("ref_chosen_logps", column("ref_chosen_logps"))
            .add_column("ref_rejected_logps", column("ref_rejected_logps")))


@contextmanager
def known_model_hash(fingerprint: str):
    """With precompute on, DPOTrainer.__init__ hashes the whole model (a full fp32 copy, tensor by tensor) only
    to name its own cache; the reference's file fingerprint, computed already, names it just as well."""
    from trl.trainer import dpo_trainer

    original = dpo_trainer.hash_module
    dpo_trainer.hash_module = lambda module: fingerprint
    try:
        yield
    finally:
        dpo_trainer.hash_module = original


def make_trainer(model, tokenizer, args, train_dataset, anneal: DictConfig, stage_dir: Path, fingerprint: str):
    from trl import DPOTrainer

    class PrecomputedReferenceDPOTrainer(DPOTrainer):
        """DPOTrainer that reads reference log-probs from the dataset's columns instead of computing them:
        no reference model is loaded or kept (TRL 1.16 has no option for log-probs computed elsewhere)."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            missing = [c for c in REF_COLUMNS if c not in dataset.column_names]
            if missing:
                raise RuntimeError(f"{name} dataset lacks precomputed reference columns {missing}")
            return dataset

    peft_config = None
    if anneal.peft is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(**OmegaConf.to_container(anneal.peft, resolve=True))
    with known_model_hash(fingerprint):  # unused here: the reference columns are read, not computed
        return PrecomputedReferenceDPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset,
                                              processing_class=tokenizer, peft_config=peft_config,
                                              callbacks=[JsonlLogger(stage_dir / "metrics.jsonl")])


def JsonlLogger(path: Path):
    """A TrainerCallback writing every log (loss, rewards/*, logps/*) as one JSON line."""
    from transformers import TrainerCallback

    class _JsonlLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a") as handle:
                    handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return _JsonlLogger()


def last_checkpoint(output_dir: str):
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


@contextmanager
def frozen_base_in_bf16(model, enabled: bool):
    """LoRA under bf16 autocast: the frozen Linear weights stored in bf16 (`frozen_linears_to_bf16`), and PEFT's
    float32 round trip of a bf16 input before the adapter switched off (autocast casts it straight back: the
    same numbers, one copy fewer per layer). Yields whether it applied."""
    if not enabled:
        yield False
        return
    import torch
    from peft.helpers import disable_input_dtype_casting

    frozen_linears_to_bf16(model)
    # What stays float32 may be a view of the checkpoint's memory map, which would keep the whole file (the
    # float32 weights just cast included) mapped and resident: give it memory of its own.
    for param in model.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.clone()
    models.release_memory()  # the float32 copies just dropped, and the reference pass's leftovers
    with disable_input_dtype_casting(model):
        yield True


FLOAT32_SDPA = "merge_anneal_sdpa_float32"


@contextmanager
def float32_attention(model, enabled: bool):
    """Train with attention in float32 under CPU bf16 autocast: transformers' own SDPA attention, its inputs upcast
    and autocast off inside. On CPU the bf16 backward kernel of SDPA ran 3x slower than the float32 one (8 x 12
    heads x 134 tokens: 47 vs 16 ms), so bf16 attention does not pay there (measured at 94.5M parameters:
    forward + backward 12% faster, and the softmax more exact); on CUDA bf16 attention stays. Not with LoRA,
    which is chosen to save memory: its peak is the activations, and float32 q, k, v and output cost 110-200 MB
    more there (1410 -> 1550-1620 MB at 94.5M parameters). Applies to models using `sdpa`; the model's
    attention is restored afterwards (saved configs name a standard one). Yields whether it applied."""
    if not enabled or model.config._attn_implementation != "sdpa":
        yield False
        return
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast(query.device.type, enabled=False):
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)

    AttentionInterface.register(FLOAT32_SDPA, attention)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)  # the masks SDPA takes
    model.set_attn_implementation(FLOAT32_SDPA)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")


@contextmanager
def lean_saved_tensors(trainer, autocast: bool):
    """Train with `LeanSavedTensors` hooks. Under bf16 autocast, autocast's weight cache is switched off as
    well: it would hold the bf16 copy of every weight until the forward ends (each weight is cast once per
    forward either way). Yields the hooks (their `counts` say what was stored leaner)."""
    import torch

    if autocast:
        from accelerate.utils import AutocastKwargs

        trainer.accelerator.autocast_handler = AutocastKwargs(cache_enabled=False)  # read when train() wraps forward
    hooks = LeanSavedTensors()
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield hooks


class LeanSavedTensors:
    """Saved-tensor hooks that keep less for the backward pass; every gradient stays bit-identical.

    - A bf16 cast of a float32 parameter (autocast casts every weight for its matmul, and autograd keeps the
      copy: 2 bytes per parameter at the activation peak) is stored as the parameter and cast again in backward.
    - SiLU's output is recomputed from its input, which SiLU keeps anyway; so is the gated product
      silu(gate) * up, whose factors the product keeps (Llama's MLP would store all four).
    - Casts of one tensor to one dtype are stored once (autocast casts a layer's input once per consumer: q, k,
      v); the same autograd source means the same values, so no comparison of contents is needed.
    """

    def __init__(self):
        from collections import Counter, deque

        self.counts = Counter()
        self._recent_casts = deque(maxlen=8)  # weak references: a cast lives only as long as autograd keeps it

    def pack(self, tensor):
        base = tensor if tensor._base is None else tensor._base
        node = base.grad_fn
        view = (tensor.size(), tensor.stride(), tensor.storage_offset())
        if node is None or base.storage_offset() != 0:
            return tensor
        if node.name() == "SiluBackward0":
            self.counts["silu_recomputed"] += 1
            return "silu", node, view
        factors = [f for f, _ in node.next_functions]
        if (node.name() == "MulBackward0" and all(f is not None for f in factors)  # both need grad: both kept
                and any(f.name() == "SiluBackward0" for f in factors)):
            self.counts["gated_product_recomputed"] += 1  # silu(gate) * up, whose factors the mul keeps
            return "product", node, view
        if node.name() != "ToCopyBackward0":
            return tensor
        param = getattr(node.next_functions[0][0], "variable", None)  # AccumulateGrad of a leaf
        if param is not None and param.shape == base.shape and param.dtype != base.dtype and base.is_contiguous():
            self.counts["parameter_cast_recomputed"] += 1
            return "cast", param, view, base.dtype
        source = node.next_functions[0]  # (autograd node, output): the tensor this was cast from
        for ref in self._recent_casts:
            other = ref()  # alive: so are its grad_fn and the node it was cast from, and identity is safe
            if (other is not None and other is not base and other.dtype == base.dtype and other.shape == base.shape
                    and other.stride() == base.stride() and other.storage_offset() == 0
                    and other.grad_fn.next_functions[0] == source):
                self.counts["equal_cast_shared"] += 1
                return "same", other, view
        self._recent_casts.append(weakref.ref(base))
        return tensor

    @staticmethod
    def unpack(packed):
        import torch

        if not isinstance(packed, tuple):
            return packed
        kind, source, view, *dtype = packed
        if kind == "silu":
            value = torch.nn.functional.silu(source._saved_self)
        elif kind == "product":
            value = source._saved_self * source._saved_other
        elif kind == "cast":
            value = source.detach().to(dtype[0])
        else:
            value = source
        return value.as_strided(*view)


def frozen_linears_to_bf16(model) -> int:
    """Under bf16 autocast a frozen Linear's float32 weight is only ever used through its bf16 cast, so store
    it in bf16: the same numbers, half the bytes, no cast at every step. Trainable weights (the LoRA adapter)
    stay float32 master weights. Returns how many layers were cast."""
    import torch

    frozen = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
              and not any(p.requires_grad for p in m.parameters(recurse=False))]
    for module in frozen:
        module.to(torch.bfloat16)
    return len(frozen)


def merge_adapter(merged_dir: Path, adapter_dir: Path):
    """The merged model in float32, read back from disk, with the trained LoRA adapter merged in."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def save_model(model, tokenizer, out_dir: Path) -> None:
    """safetensors + tokenizer + chat template."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_dir(out_dir, write)


def _tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(json.dumps({"vocab": sorted(tokenizer.get_vocab().items()),
                                      "template": tokenizer.chat_template, "eos": tokenizer.eos_token,
                                      "pad": tokenizer.pad_token}, sort_keys=True).encode()).hexdigest()
