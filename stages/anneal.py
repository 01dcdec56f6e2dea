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
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, launch, logs, memory, models, perf, preferences, records
from pipeline import reference as ref
from pipeline.artifacts import publish
from pipeline.reference import REF_COLUMNS, reference_logps

log = logging.getLogger(__name__)

# TRL 1.16's DPO loss types (dpo_trainer.py, `_compute_loss`).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# DPOConfig fields the stage owns: where things are written, and the precomputed reference.
OWNED_FIELDS = {"output_dir", "precompute_ref_log_probs"}
# transformers' samplers that read a length per row (TrainingArguments.train_sampling_strategy).
LENGTH_SAMPLERS = ("group_by_length", "batch_rebalance")
# anneal.method: TRL's reference-free trainers besides DPO (module, config, trainer), experimental in TRL 1.16.
METHODS = {"cpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
           "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer")}


def run(cfg: DictConfig, run_dir: Path) -> records.AnnealRecord:
    """Anneal the merged model; returns the stage's record. With `distributed=...` this same function runs on
    every process under accelerate (`pipeline/launch.py`); the main process alone writes run outputs."""
    if launch.wanted(cfg):
        return launch.run(cfg, run_dir)
    switches, clock = cfg.anneal.perf, perf.PhaseClock()
    stage_dir = Path(run_dir) / "anneal"
    merge = records.load(run_dir, records.MergeRecord)
    merged_dir = Path(merge.outputs.model)
    if str(cfg.anneal.reference) == "parents":  # every parent scores every pair; combined per pair
        references = {name: merge.source(path) for name, path in
                      ref.check_parents_reference(cfg.anneal, merge.inputs.parents).items()}
        choice, label = "parents", f"parents:{cfg.anneal.reference_combine}"
    else:
        choice, label = choose_reference(cfg.anneal.reference, merge.inputs.parents, merge.inputs.base_model,
                                         merged_dir)
        references = {label: merge.source(choice) if choice in merge.inputs.models else models.resolve(choice)}
    reference = next(iter(references.values()))  # the one reference; with `parents`, eval's KL anchor
    with perf.fingerprint_in_background(reference.path, switches.fingerprint_in_background) as hashing:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
        from transformers import AutoTokenizer
        from trl import DPOTrainer  # noqa: F401  (imported before garbage collection skips the libraries' objects)
    reference_fingerprint = hashing.result()
    fingerprints = {name: reference_fingerprint if source is reference else models.fingerprint(source.path)
                    for name, source in references.items()}
    if choice == "parents":  # what the stored log-probs depend on: every parent and the combination
        reference_fingerprint = hashlib.sha256(json.dumps([fingerprints, label], sort_keys=True).encode()).hexdigest()
    ranks = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # this process's rank (of one, or more)
    main = ranks.is_main_process
    clock.lap("imports_and_fingerprint")

    with (perf.malloc_keeps_freed_memory(switches.malloc_keeps_freed_memory) as malloc_kept,
          perf.gc_skips_existing_objects(switches.gc_skips_existing_objects) as gc_skipped):
        stage_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        for source in references.values():
            models.check_same_vocabulary(
                tokenizer, merged_dir, source.path, "The reference model",
                "use a parent with the same tokenizer (anneal.reference=auto or a parent name), or merge without "
                "changing the vocabulary.")
        n_params = models.count_parameters(merged_dir)
        precision = perf.decide_precision(cfg.anneal, n_params)
        args = dpo_config(cfg.anneal, stage_dir / "checkpoints", precision)
        train_args = method_config(cfg.anneal, args, precision)  # = args for DPO
        models.check_quantization(cfg.anneal)
        plan = memory.for_anneal(cfg, merged_dir, args, precision, n_params)
        log.info(f"anneal: {plan.describe() if plan else 'no memory plan for this architecture'}")
        if plan and cfg.anneal.memory_check:
            memory.check(plan)
        routed = choice == "parents" and cfg.anneal.reference_combine == "route"
        pairs, dropped = preferences.load_preferences(cfg.data, keep=(cfg.anneal.reference_route,) if routed else ())
        # each pair's parent under `route`, checked before any model is loaded
        routes = ref.route_of(pairs, cfg.anneal.reference_route, list(references)) if routed else None
        clock.lap("setup")

        # Score every pair with the reference, once (cached across runs; split across processes).
        if choice == "parents":
            store_path, cache_state, by_parent = parents_reference_logps(
                references, fingerprints, tokenizer, pairs, routes, args, precision, cfg, stage_dir, ranks)
        else:
            store_path, cache_state = reference_logps(reference.path, reference_fingerprint, tokenizer, pairs, args,
                                                      precision, cfg, stage_dir, ranks)
            by_parent = None
        scored = preferences.read_store(store_path)
        for split in scored:  # TRL drops pairs whose prompt alone fills max_length: counted, never silent
            dropped[split]["prompt_too_long"] = len(pairs[split]) - len(scored[split])
        if dropped["train"]["prompt_too_long"]:
            log.warning(f"anneal: {dropped['train']['prompt_too_long']} of {len(pairs['train'])} training pairs have a "
                        f"prompt of at least anneal.trainer.max_length={args.max_length} tokens and are left out")
        clock.lap("reference_logps")
        log.info(f"anneal: {len(scored['train'])} train / {len(scored['heldout'])} held-out pairs; dropped "
                 f"{dropped}; reference {label} ({', '.join(s.public_name() for s in references.values())}); "
                 f"reference log-probs: cache {cache_state}")

        # Train the merged model against the stored reference log-probs.
        checkpoint = last_checkpoint(train_args.output_dir) if cfg.pipeline.resume else None
        if checkpoint is None and main:  # a fresh start: no stale checkpoints or metrics from an earlier attempt
            shutil.rmtree(train_args.output_dir, ignore_errors=True)
            (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
        ranks.wait_for_everyone()
        model = models.load_policy(merged_dir, cfg.anneal, precision.frozen_linear_weights, ranks.local_process_index)
        training_pairs = scored["train"].select_columns([*preferences.COLUMNS, *REF_COLUMNS])  # TRL's columns only
        trainer = make_trainer(model, tokenizer, train_args, training_pairs, cfg.anneal, stage_dir,
                               perf.known_model_hash(reference_fingerprint, switches.skip_trl_model_hash))
        with perf.training(trainer, model, precision, switches) as applied:
            clock.lap("setup")
            trainer.train(resume_from_checkpoint=checkpoint)
        clock.lap("train")
        final = dict(trainer.state.log_history[-1]) if trainer.state.log_history else {}
        engine = trainer.accelerator.distributed_type.value  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED

        # Save: full weights, or the adapter on its own and merged into the float32 merged weights.
        out_dir, adapter_dir = stage_dir / "model", stage_dir / "adapter"
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathered (FSDP, ZeRO-3) on main
        trained = trainer.accelerator.unwrap_model(trainer.model)
        check_finite(trained, trainer.state.global_step, train_args)
        if main and cfg.anneal.peft is None:
            models.save_model(trained, tokenizer, out_dir, state_dict)
        elif main:  # PEFT format, safetensors
            publish(adapter_dir, partial(trained.save_pretrained, state_dict=state_dict))
        del trainer, model, trained, state_dict
        models.release_memory()
        if main and cfg.anneal.peft is not None:
            models.save_model(models.merge_adapter(merged_dir, adapter_dir), tokenizer, out_dir)
        ranks.wait_for_everyone()
        clock.lap("save")

    return records.AnnealRecord(
        inputs={"model": str(merged_dir), "reference": choice if models.is_hub_id(choice) or by_parent
                else reference.path, "reference_path": reference.path, "reference_label": label,
                "reference_source": reference, "data": preferences.sources(cfg.data),
                **({"references": by_parent} if by_parent else {})},
        outputs={"model": str(out_dir), "reference_logps": str(store_path), "metrics": str(stage_dir / "metrics.jsonl"),
                 **({"adapter": str(adapter_dir)} if cfg.anneal.peft is not None else {})},
        reference_fingerprint=reference_fingerprint,
        config={"anneal": OmegaConf.to_container(cfg.anneal, resolve=True),
                "data": OmegaConf.to_container(cfg.data, resolve=True)},
        precision=precision.record(),
        memory_plan=plan.record() if plan else None,
        processes=ranks.num_processes,
        distributed_type=engine,
        process={"malloc_keeps_freed_memory": malloc_kept, "gc_skipped_objects": gc_skipped},
        perf={"switches": OmegaConf.to_container(switches),
              "applied": {**{name: bool(applied[name]) for name in ("frozen_base_in_bf16", "float32_attention")},
                          "packing": packing_record(applied["packing"])}},
        saved_for_backward=applied["saved_for_backward"],  # what LeanSavedTensors stored leaner, over training
        data={"train_pairs": len(scored["train"]), "heldout_pairs": len(scored["heldout"]), "dropped": dropped},
        cache={"reference_logps": cache_state,
               **({"reference_logps_by_parent": {n: p["cache"] for n, p in by_parent.items()}} if by_parent else {})},
        reference_batch_size=args.precompute_ref_batch_size,
        resumed_from=checkpoint,
        final_log=final,
        seconds_by_phase=clock.seconds,
    )


def parents_reference_logps(references: dict, fingerprints: dict, tokenizer, pairs, routes, args, precision, cfg,
                             stage_dir: Path, ranks):
    """`anneal.reference=parents`: each parent's pass (cached on its own) at `reference_logps_by_parent/<name>`,
    combined into `reference_logps/data.parquet` by `anneal.reference_combine` (`routes`: `route_of`'s, under
    route). Returns (store, "hit" when every
    parent's pass was, else "miss", per parent: path, fingerprint, cache)."""
    by_parent = {}
    for name, source in references.items():
        path, state = reference_logps(source.path, fingerprints[name], tokenizer, pairs, args, precision, cfg,
                                      stage_dir, ranks, local=stage_dir / "reference_logps_by_parent" / name)
        by_parent[name] = {"path": source.path, "fingerprint": fingerprints[name], "store": str(path), "cache": state}
    store = stage_dir / "reference_logps" / "data.parquet"
    if ranks.is_main_process:
        stores = {name: preferences.read_store(Path(p["store"])) for name, p in by_parent.items()}
        combined = ref.combine(stores, cfg.anneal.reference_combine, routes)
        publish(store.parent, lambda tmp: (tmp.mkdir(), preferences.write_store(combined, tmp / "data.parquet")))
    ranks.wait_for_everyone()
    state = "hit" if all(p["cache"] == "hit" for p in by_parent.values()) else "miss"
    return store, state, by_parent


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
    from trl import DPOConfig

    fields = trainer_fields(anneal.trainer, precision)
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


def trainer_fields(trainer: DictConfig, precision: perf.Precision) -> dict:
    """`anneal.trainer` as a dict, with bf16 as `precision` decided (and use_cpu where that means CPU)."""
    import torch
    from accelerate.utils import parse_flag_from_env

    fields = OmegaConf.to_container(trainer, resolve=True)
    fields["bf16"] = precision.autocast == "bfloat16"
    if (fields["bf16"] and not torch.cuda.is_available()) or parse_flag_from_env("ACCELERATE_USE_CPU"):
        fields.setdefault("use_cpu", True)  # bf16 on CPU is meant; CPU processes under accelerate launch
    return fields


def method_config(anneal: DictConfig, dpo_args, precision: perf.Precision):
    """The training config of `anneal.method`: `dpo_args` for DPO; for a reference-free method, TRL's own
    CPOConfig / ORPOConfig from `anneal.method_args` and the Trainer fields of `anneal.trainer`."""
    import dataclasses
    import importlib

    from transformers import TrainingArguments

    method, method_args = str(anneal.method), OmegaConf.to_container(anneal.method_args, resolve=True) or {}
    if method == "dpo":
        if method_args:
            raise UserError(f"anneal.method_args {sorted(method_args)} are set but anneal.method=dpo takes its fields "
                            "from anneal.trainer. Fix: move them to anneal.trainer, or choose anneal.method=cpo/orpo.")
        return dpo_args
    if method not in METHODS:
        raise UserError(f"Unknown anneal.method={method}. Fix: use dpo (default), or one of TRL's reference-free "
                        f"trainers: {', '.join(METHODS)}.")
    module, config_name, _ = METHODS[method]
    config_class = getattr(importlib.import_module(module), config_name)
    shared = {f.name for f in dataclasses.fields(TrainingArguments)} | {"max_length"}  # what means the same there
    fields = {k: v for k, v in trainer_fields(anneal.trainer, precision).items() if k in shared}
    if fields.get("train_sampling_strategy") in LENGTH_SAMPLERS:  # needs a length column those trainers drop
        log.info(f"anneal: {method} trains on random batches (train_sampling_strategy="
                 f"{fields['train_sampling_strategy']} is for DPO)")
        fields["train_sampling_strategy"] = "random"
    owned = sorted(set(method_args) & OWNED_FIELDS)
    if owned:
        raise UserError(f"anneal.method_args.{owned[0]} is set by merge-anneal. Fix: remove it.")
    try:
        args = config_class(**{**fields, **method_args, "output_dir": dpo_args.output_dir})
        for field in dataclasses.fields(config_class):  # the choices TRL lists but does not check until training
            choices = field.metadata.get("choices")
            if choices and field.name in method_args and getattr(args, field.name) not in choices:
                raise ValueError(f"{field.name}={getattr(args, field.name)!r} is not one of {choices}")
    except (TypeError, ValueError) as err:
        raise UserError(f"TRL's {config_name} rejected anneal.method_args: {err}. Fix: use {config_name} field "
                        f"names and values (see conf/anneal/dpo.yaml and conf/anneal_variant/).") from None
    return args


def make_trainer(model, tokenizer, args, train_dataset, anneal: DictConfig, stage_dir: Path, trl_model_hash):
    """TRL's DPOTrainer, reading the reference log-probs from the dataset's columns instead of computing them:
    no reference model is loaded or kept (TRL 1.16 has no option for log-probs computed elsewhere). With
    `anneal.method` cpo or orpo, that reference-free trainer on the pairs alone. A loss that stops being finite
    stops training at that step."""
    import importlib

    import torch
    from trl import DPOTrainer

    class StopsWhenNotFinite:
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if not torch.isfinite(loss):
                raise UserError(diverged(f"the {anneal.method.upper()} loss became {loss.item()}",
                                         self.state.global_step + 1, self.args))
            return loss

    class PrecomputedReferenceDPOTrainer(StopsWhenNotFinite, DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            missing = [c for c in REF_COLUMNS if c not in dataset.column_names]
            if missing:
                raise RuntimeError(f"{name} dataset lacks precomputed reference columns {missing}")
            return dataset

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """TRL's tokenized pairs, with each row's padded length where the sampler groups by it."""
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.train_sampling_strategy in LENGTH_SAMPLERS and args.length_column_name not in dataset.column_names:
                lengths = preferences.padded_lengths(dataset, args.max_length)
                dataset = dataset.add_column(args.length_column_name, lengths)
            return dataset

        def _set_signature_columns_if_needed(self):  # the length column reaches the sampler (TRL's collator skips it)
            super()._set_signature_columns_if_needed()
            if self.args.train_sampling_strategy in LENGTH_SAMPLERS:
                self._signature_columns = [*self._signature_columns, self.args.length_column_name]

    peft_config = None
    if anneal.peft is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(**OmegaConf.to_container(anneal.peft, resolve=True))
    callbacks = [logs.JsonlLogger(stage_dir / "metrics.jsonl")]
    if str(anneal.method) in METHODS:
        module, _, trainer_name = METHODS[str(anneal.method)]
        trainer_class = type(trainer_name, (StopsWhenNotFinite, getattr(importlib.import_module(module), trainer_name)),
                             {})
        return trainer_class(model=model, args=args, train_dataset=train_dataset.select_columns(preferences.COLUMNS),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    with trl_model_hash:  # TRL names its (unused) precompute cache by a hash of the model
        return PrecomputedReferenceDPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset,
                                              processing_class=tokenizer, peft_config=peft_config,
                                              callbacks=callbacks)


def packing_record(counts: dict | None) -> dict | None:
    """What packing saved in training: rows and token positions computed, padded against packed."""
    if counts is None:
        return None
    share = 1 - counts["packed_positions"] / counts["positions"] if counts["positions"] else 0.0
    return {"rows": counts["rows"], "packed_rows": counts["packed_rows"], "positions": counts["positions"],
            "packed_positions": counts["packed_positions"], "positions_saved": round(share, 4),
            "switched_off": counts["off"]}


def diverged(what: str, step: int, args) -> str:
    return (f"Training diverged: {what} at step {step}, so no weights were saved. Fix: a lower "
            f"anneal.trainer.learning_rate (now {args.learning_rate:g}), gradient clipping "
            f"(anneal.trainer.max_grad_norm, now {args.max_grad_norm}), or a smaller beta (now {args.beta:g}).")


def check_finite(model, step: int, args) -> None:
    """Non-finite weights are never saved (a step can turn them NaN with a finite loss, e.g. the last one)."""
    import torch

    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise UserError(diverged(f"{len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]})", step, args))


def last_checkpoint(output_dir: str):
    """The newest complete checkpoint. The Trainer writes `trainer_state.json` last, so a folder without a readable
    one was cut short (a kill while saving) and is skipped for the one before it."""
    steps = lambda folder: int(folder.name.rsplit("-", 1)[1]) if folder.name.rsplit("-", 1)[1].isdigit() else -1
    for folder in sorted(Path(output_dir).glob("checkpoint-*"), key=steps, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            log.warning(f"anneal: {folder.name} was cut short while saving (no readable trainer_state.json); skipped")
    return None
