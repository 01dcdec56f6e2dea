"""Stage 2, anneal: TRL DPO on the merged model, with an unmerged parent as the reference policy.

1. Choose the reference: the merge's base model, else its first parent (`anneal.reference` picks another).
2. Score every training and held-out pair with it once, through TRL's own precompute, and store the log-probs
   as parquet (`prompt, chosen, rejected, ref_chosen_logps, ref_rejected_logps`) in a cache shared across
   runs. The reference is then released.
3. Train the merged model with TRL's DPOTrainer, which reads the stored log-probs: no reference is resident.
   (Left to its defaults, TRL would make the merged model its own reference.)
4. Save `<run_dir>/anneal/model/` (LoRA: the adapter merged into the float32 weights), `metrics.jsonl`.

What makes it fast and lean sits in `pipeline/perf.py`, each piece behind a switch in `anneal.perf`.
"""

import hashlib
import json
import logging
import shutil
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, models, perf, preferences, records
from pipeline.artifacts import publish, through_cache

log = logging.getLogger(__name__)

# TRL 1.16's DPO loss types (dpo_trainer.py, `_compute_loss`).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# DPOConfig fields the stage owns: where things are written, and the precomputed reference.
OWNED_FIELDS = {"output_dir", "precompute_ref_log_probs"}


def run(cfg: DictConfig, run_dir: Path) -> records.AnnealRecord:
    """Anneal the merged model; returns the stage's record."""
    switches, clock = cfg.anneal.perf, perf.PhaseClock()
    stage_dir = Path(run_dir) / "anneal"
    merge = records.load(run_dir, records.MergeRecord)
    merged_dir = Path(merge.outputs.model)
    choice, label = choose_reference(cfg.anneal.reference, merge.inputs.parents, merge.inputs.base_model, merged_dir)
    reference = merge.source(choice) if choice in merge.inputs.models else models.resolve(choice)
    with perf.fingerprint_in_background(reference.path, switches.fingerprint_in_background) as hashing:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOTrainer  # noqa: F401  (imported before garbage collection skips the libraries' objects)
    reference_fingerprint = hashing.result()
    clock.lap("imports_and_fingerprint")

    with (perf.malloc_keeps_freed_memory(switches.malloc_keeps_freed_memory) as malloc_kept,
          perf.gc_skips_existing_objects(switches.gc_skips_existing_objects) as gc_skipped):
        stage_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        models.check_same_vocabulary(
            tokenizer, merged_dir, reference.path, "The reference model",
            "use a parent with the same tokenizer (anneal.reference=auto or a parent name), or merge without changing "
            "the vocabulary.")
        precision = perf.decide_precision(cfg.anneal, models.count_parameters(merged_dir))
        args = dpo_config(cfg.anneal, stage_dir / "checkpoints", precision)
        pairs, dropped = preferences.load_preferences(cfg.data)
        clock.lap("setup")

        # Score every pair with the reference, once (cached across runs).
        store_path, cache_state = reference_logps(reference.path, reference_fingerprint, tokenizer, pairs, args,
                                                  precision, cfg, stage_dir)
        scored = preferences.read_store(store_path)
        for split in scored:  # TRL drops pairs whose prompt alone fills max_length: counted, never silent
            dropped[split]["prompt_too_long"] = len(pairs[split]) - len(scored[split])
            if len(scored[split]) == 0:
                raise UserError(f"Every {split} prompt fills anneal.trainer.max_length={args.max_length} tokens, so "
                                "no pair is left to train on. Fix: raise anneal.trainer.max_length.")
        clock.lap("reference_logps")
        log.info(f"anneal: {len(scored['train'])} train / {len(scored['heldout'])} held-out pairs; dropped "
                 f"{dropped}; reference {label} ({reference.public_name()}); reference log-probs: cache {cache_state}")

        # Train the merged model against the stored reference log-probs.
        checkpoint = last_checkpoint(args.output_dir) if cfg.pipeline.resume else None
        if checkpoint is None:  # a fresh start: no stale checkpoints or metrics from an earlier attempt
            shutil.rmtree(args.output_dir, ignore_errors=True)
            (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)  # fp32 master weights
        trainer = make_trainer(model, tokenizer, args, scored["train"], cfg.anneal, stage_dir,
                               perf.known_model_hash(reference_fingerprint, switches.skip_trl_model_hash))
        with perf.training(trainer, model, precision, switches) as applied:
            clock.lap("setup")
            trainer.train(resume_from_checkpoint=checkpoint)
        clock.lap("train")
        final = dict(trainer.state.log_history[-1]) if trainer.state.log_history else {}

        # Save: full weights, or the adapter on its own and merged into the float32 merged weights.
        out_dir, adapter_dir = stage_dir / "model", stage_dir / "adapter"
        if cfg.anneal.peft is None:
            save_model(trainer.model, tokenizer, out_dir)
        else:
            publish(adapter_dir, trainer.model.save_pretrained)  # PEFT format, safetensors
        del trainer, model
        models.release_memory()
        if cfg.anneal.peft is not None:
            save_model(merge_adapter(merged_dir, adapter_dir), tokenizer, out_dir)
        clock.lap("save")

    return records.AnnealRecord(
        inputs={"model": str(merged_dir), "reference": choice if models.is_hub_id(choice) else reference.path,
                "reference_path": reference.path, "reference_label": label, "reference_source": reference,
                "data": preferences.sources(cfg.data)},
        outputs={"model": str(out_dir), "reference_logps": str(store_path), "metrics": str(stage_dir / "metrics.jsonl"),
                 **({"adapter": str(adapter_dir)} if cfg.anneal.peft is not None else {})},
        reference_fingerprint=reference_fingerprint,
        config={"anneal": OmegaConf.to_container(cfg.anneal, resolve=True),
                "data": OmegaConf.to_container(cfg.data, resolve=True)},
        precision=precision.record(),
        process={"malloc_keeps_freed_memory": malloc_kept, "gc_skipped_objects": gc_skipped},
        perf={"switches": OmegaConf.to_container(switches), "applied": {name: bool(applied[name]) for name in
                                                                         ("frozen_base_in_bf16", "float32_attention")}},
        saved_for_backward=applied["saved_for_backward"],  # what LeanSavedTensors stored leaner, over training
        data={"train_pairs": len(scored["train"]), "heldout_pairs": len(scored["heldout"]), "dropped": dropped},
        cache={"reference_logps": cache_state},
        reference_batch_size=args.precompute_ref_batch_size,
        resumed_from=checkpoint,
        final_log=final,
        seconds_by_phase=clock.seconds,
    )


def choose_reference(choice, parents: list[str], base: str | None, merged_dir: Path) -> tuple[str, str]:
    """The reference policy and how it was chosen: `auto` (merge base model, else first parent), a parent name or
    index, `merged` (only when asked for by name), or any folder / hub id."""
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


def dpo_config(anneal: DictConfig, output_dir: Path, precision: perf.Precision):
    """TRL's own DPOConfig from `anneal.trainer` (field names unchanged), plus the fields the stage owns; bf16
    as `precision` decided."""
    import torch
    from trl import DPOConfig

    fields = OmegaConf.to_container(anneal.trainer, resolve=True)
    fields["bf16"] = precision.autocast == "bfloat16"
    if fields["bf16"] and not torch.cuda.is_available():
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
    if args.beta <= 0:
        raise UserError(f"anneal.trainer.beta must be positive (got {args.beta}): it scales the implicit "
                        "reward. Fix: e.g. anneal.trainer.beta=0.1.")
    tokens = anneal.perf.reference_pass_tokens
    if args.precompute_ref_batch_size is None and tokens:
        args.precompute_ref_batch_size = perf.reference_batch_size(args.per_device_train_batch_size, args.max_length,
                                                                   tokens)
    return args


def reference_logps(reference_dir: str, reference_fingerprint: str, tokenizer, pairs, args, precision, cfg,
                    stage_dir: Path):
    """Score every pair with the reference once; cached by (reference weights, tokenizer, data, lengths)."""
    local = stage_dir / "reference_logps"
    switches = cfg.anneal.perf

    def compute(tmp: Path) -> None:
        scored = score_with_reference(reference_dir, tokenizer, pairs, args, precision,
                                      perf.known_model_hash(reference_fingerprint, switches.skip_trl_model_hash))
        tmp.mkdir(parents=True)
        preferences.write_store(scored, tmp / "data.parquet")

    if not cfg.pipeline.cache:
        publish(local, compute)
        return local / "data.parquet", "miss"
    key = hashlib.sha256(json.dumps({
        "reference": reference_fingerprint,
        "tokenizer": models.tokenizer_fingerprint(tokenizer),
        "data_rows": {split: preferences.rows_fingerprint(pairs[split]) for split in pairs},
        "max_length": args.max_length, "truncation_mode": args.truncation_mode, "ld_alpha": args.ld_alpha,
        "autocast": bool(args.bf16), "trl": version("trl"),
    }, sort_keys=True).encode()).hexdigest()[:32]
    cached = Path(cfg.pipeline.cache_dir).expanduser() / "reference_logps" / key
    state = through_cache(cached, lambda entry: publish(entry, compute), local)
    return local / "data.parquet", state


def score_with_reference(reference_dir: str, tokenizer, pairs, args, precision, trl_model_hash):
    """One batched no-grad pass of the reference through TRL's own precompute (tokenisation, masks, log-probs),
    over the train and held-out pairs. The reference is freed before this returns."""
    import datasets
    import torch
    from datasets import DatasetDict
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).requires_grad_(False)
    if precision.reference_linear_weights == "bfloat16":  # autocast would cast each weight at every forward
        perf.frozen_linears_to_bf16(reference)
    indexed = {split: ds.add_column("row", list(range(len(ds)))) for split, ds in pairs.items()}
    caching = datasets.is_caching_enabled()
    datasets.disable_caching()  # TRL's own precompute cache would outlive pipeline.cache=false; ours is the cache
    try:
        with trl_model_hash:
            trainer = DPOTrainer(model=reference, args=args, train_dataset=indexed["train"],
                                 eval_dataset=indexed["heldout"], processing_class=tokenizer)
    finally:
        if caching:
            datasets.enable_caching()
    scored = DatasetDict({"train": _attach(pairs["train"], trainer.train_dataset),
                          "heldout": _attach(pairs["heldout"], trainer.eval_dataset)})
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


def make_trainer(model, tokenizer, args, train_dataset, anneal: DictConfig, stage_dir: Path, trl_model_hash):
    """TRL's DPOTrainer, reading the reference log-probs from the dataset's columns instead of computing them:
    no reference model is loaded or kept (TRL 1.16 has no option for log-probs computed elsewhere)."""
    from trl import DPOTrainer

    class PrecomputedReferenceDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            missing = [c for c in REF_COLUMNS if c not in dataset.column_names]
            if missing:
                raise RuntimeError(f"{name} dataset lacks precomputed reference columns {missing}")
            return dataset

    peft_config = None
    if anneal.peft is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(**OmegaConf.to_container(anneal.peft, resolve=True))
    with trl_model_hash:  # TRL names its (unused) precompute cache by a hash of the model
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

    publish(out_dir, write)
