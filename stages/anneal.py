"""Stage 2, anneal: TRL DPO on the merged model, with an unmerged parent as the reference policy.

0. Check the merge is not gibberish: its held-out perplexity against every parent's (`pipeline/merge_check.py`).
1. Choose the reference: the merge's base model, else its first parent (`anneal.reference` picks another).
2. Score every training and held-out pair with it once, through TRL's own precompute, and store the log-probs
   as parquet (`prompt, chosen, rejected, ref_chosen_logps, ref_rejected_logps`) in a cache shared across
   runs. The reference is then released.
3. Train the merged model with TRL's DPOTrainer, which reads the stored log-probs: no reference is resident.
   (Left to its defaults, TRL would make the merged model its own reference.)
4. Save `<run_dir>/anneal/model/` (LoRA: the adapter merged into the float32 weights), `metrics.jsonl`.

What makes it fast and lean sits in `pipeline/perf.py`, each piece behind a switch in `anneal.perf`.
TRL's configs and trainer sit in `pipeline/training.py`, the reference pass in `pipeline/reference.py`.
"""

import hashlib
import json
import logging
import os
import shutil
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, launch, memory, merge_check, models, perf, preferences, records, training
from pipeline import reference as ref
from pipeline.artifacts import publish
from pipeline.reference import REF_COLUMNS, reference_logps

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> records.AnnealRecord:
    """Anneal the merged model; returns the stage's record. With `distributed=...` this same function runs on
    every process under accelerate (`pipeline/launch.py`); the main process alone writes run outputs."""
    merge = records.load(run_dir, records.MergeRecord)
    # 0. A merge far worse than every parent on held-out answers is refused before hours go into it (once, in the
    #    pipeline's own process)
    checked = None if os.environ.get(launch.LAUNCHED) else merge_check.perplexity_gate(cfg, merge)
    if launch.wanted(cfg):
        return launch.run(cfg, run_dir).model_copy(update={"merge_check": checked})
    switches, clock = cfg.anneal.perf, perf.PhaseClock()
    stage_dir = Path(run_dir) / "anneal"
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
        args = training.dpo_config(cfg.anneal, stage_dir / "checkpoints", precision)
        train_args = training.method_config(cfg.anneal, args, precision)  # = args for DPO
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
            store_path, cache_state, by_parent = ref.parents_reference_logps(
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
        checkpoint = training.last_checkpoint(train_args.output_dir) if cfg.pipeline.resume else None
        if checkpoint is None and main:  # a fresh start: no stale checkpoints or metrics from an earlier attempt
            shutil.rmtree(train_args.output_dir, ignore_errors=True)
            (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
        ranks.wait_for_everyone()
        model = models.load_policy(merged_dir, cfg.anneal, precision.frozen_linear_weights, ranks.local_process_index)
        training_pairs = scored["train"].select_columns([*preferences.COLUMNS, *REF_COLUMNS])  # TRL's columns only
        trainer = training.make_trainer(model, tokenizer, train_args, training_pairs, cfg.anneal, stage_dir,
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
        training.check_finite(trained, trainer.state.global_step, train_args)
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
        merge_check=checked,
        config={"anneal": OmegaConf.to_container(cfg.anneal, resolve=True),
                "data": OmegaConf.to_container(cfg.data, resolve=True)},
        precision=precision.record(),
        memory_plan=plan.record() if plan else None,
        processes=ranks.num_processes,
        distributed_type=engine,
        process={"malloc_keeps_freed_memory": malloc_kept, "gc_skipped_objects": gc_skipped},
        perf={"switches": OmegaConf.to_container(switches),
              "applied": {**{name: bool(applied[name]) for name in ("frozen_base_in_bf16", "float32_attention")},
                          "packing": training.packing_record(applied["packing"])}},
        saved_for_backward=applied["saved_for_backward"],  # what LeanSavedTensors stored leaner, over training
        data={"train_pairs": len(scored["train"]), "heldout_pairs": len(scored["heldout"]), "dropped": dropped},
        cache={"reference_logps": cache_state,
               **({"reference_logps_by_parent": {n: p["cache"] for n, p in by_parent.items()}} if by_parent else {})},
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
