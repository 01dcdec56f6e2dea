"""Stage 2, anneal: TRL DPO on the merged model, with an unmerged parent as the reference policy.

`run` reads as its phases:
0. gate: the merge's held-out perplexity against every parent's; a broken merge is refused before hours go into it
   (stages/anneal/gate.py).
1. choose the reference: the merge's base model, else its first parent (`anneal.reference` picks another, or every
   parent) (stages/anneal/references.py).
2. plan: precision, TRL's configs and the memory plan, decided before any model loads (a frozen `Plan`).
3. score the reference: every training and held-out pair once, through TRL's own precompute, stored as parquet
   (`prompt, chosen, rejected, ref_chosen_logps, ref_rejected_logps`) in a cache shared across runs; the reference
   is then released (stages/anneal/reference_pass.py).
4. train the merged model with TRL's DPOTrainer reading the stored log-probs: no reference is resident. (Left to
   its defaults, TRL would make the merged model its own reference.) Trainer classes: stages/anneal/trainers.py.
5. save `<run_dir>/anneal/model/` (LoRA: the adapter merged into the float32 weights) and `metrics.jsonl`.
6. record.

What makes it fast and lean is in stages/anneal/perf.py, each piece behind a switch in `anneal.perf`; several
processes: stages/anneal/launch.py.
"""

import logging
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import models, preferences, records
from pipeline.artifacts import publish
from pipeline.preferences import REF_COLUMNS
from pipeline.settings import CachePolicy, DataSettings
from stages.anneal import gate, launch, memory, perf, training, weights
from stages.anneal import references as refs
from stages.anneal.reference_pass import Scoring, parents_reference_logps, reference_logps
from stages.anneal.settings import AnnealSettings, MergeCheck

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """Every anneal setting, before the first stage runs: the blocks' types and values, TRL's own configs
    (DPOConfig, CPOConfig / ORPOConfig, PEFT's LoraConfig), the data files, QLoRA's and the launcher's needs."""
    anneal = AnnealSettings.of(cfg.anneal, "anneal")
    MergeCheck.of(cfg.pipeline.merge_check, "pipeline.merge_check")
    CachePolicy.of_pipeline(cfg.pipeline)
    data = DataSettings.of(cfg.data, "data")
    preferences.check_sources(data)
    if data.source != "demo":  # read and column-checked now, so a bad file costs seconds, not a merge
        preferences.load_preferences(data, keep=route_column(anneal))
    precision = perf.decide_precision(anneal, 0)  # what TRL validates does not depend on the model's size
    training.method_config(anneal, training.dpo_config(anneal, Path("checkpoints"), precision), precision)
    training.lora_config(anneal)
    weights.check_quantization(anneal)
    if launch.wanted(cfg.distributed):
        launch.check_machine(cfg.distributed, launch.processes(cfg.distributed))


def run(cfg: DictConfig, run_dir: Path) -> records.AnnealRecord:
    """Anneal the merged model; returns the stage's record. With `distributed=...` this same function runs on
    every process under accelerate (stages/anneal/worker.py); the main process alone writes run outputs."""
    anneal, data = AnnealSettings.of(cfg.anneal, "anneal"), DataSettings.of(cfg.data, "data")
    merge = records.load(run_dir, records.MergeRecord)
    references = refs.choose(anneal, merge)
    pairs, dropped, routes = load_pairs(anneal, data, references)
    validation = pairs.pop("validation", None)
    if launch.launched():  # one rank of a distributed anneal
        return anneal_here(cfg, Path(run_dir), anneal, merge, references, (pairs, dropped, routes))
    check = MergeCheck.of(cfg.pipeline.merge_check, "pipeline.merge_check")  # the gate, once, in this process
    checked = gate.perplexity_gate(check, pairs["heldout"], merge, anneal.trainer, int(cfg.eval.batch_size))
    if launch.wanted(cfg.distributed):
        record = launch.run(cfg, run_dir, len(pairs["train"]))
    else:
        record = anneal_here(cfg, Path(run_dir), anneal, merge, references, (pairs, dropped, routes))
    record = record.model_copy(update={"merge_check": checked})
    if validation is None:
        return record
    from stages.anneal import extrapolate

    chosen = extrapolate.extrapolate(
        anneal.extrapolate,
        Path(merge.outputs.model),
        Path(record.outputs.model),
        validation,
        Path(run_dir) / "anneal",
        anneal.trainer,
        int(cfg.eval.batch_size),
    )
    return record.model_copy(update={"extrapolation": chosen})


def anneal_here(
    cfg: DictConfig,
    run_dir: Path,
    anneal: AnnealSettings,
    merge: records.MergeRecord,
    references: refs.References,
    data: tuple,
) -> records.AnnealRecord:
    """This process's part of the anneal (the whole of it on one process): plan, score the reference, train, save."""
    (pairs, dropped, routes), clock = data, perf.PhaseClock()
    stage_dir, merged_dir = run_dir / "anneal", Path(merge.outputs.model)
    with perf.fingerprint_in_background(references.first.path, anneal.perf.fingerprint_in_background) as hashing:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
        from transformers import AutoTokenizer
        from trl import DPOTrainer  # noqa: F401  (imported before garbage collection skips the libraries' objects)
    fingerprint, fingerprints = references.fingerprints(hashing.result())
    ranks = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # this process's rank (of one, or more)
    clock.lap("imports_and_fingerprint")
    with (
        perf.malloc_keeps_freed_memory(anneal.perf.malloc_keeps_freed_memory) as malloc_kept,
        perf.gc_skips_existing_objects(anneal.perf.gc_skips_existing_objects) as gc_skipped,
    ):
        stage_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        check_vocabularies(tokenizer, merged_dir, references)
        plan = make_plan(anneal, merged_dir, stage_dir, launch.sharding(cfg.distributed))
        clock.lap("setup")
        scoring = Scoring(
            tokenizer, plan.args, plan.precision, CachePolicy.of_pipeline(cfg.pipeline), anneal.perf, stage_dir, ranks
        )
        stored = score_reference(scoring, anneal, references, fingerprint, fingerprints, pairs, routes, dropped)
        clock.lap("reference_logps")
        trainer, applied, checkpoint = train(
            plan, anneal, stored.scored["train"], scoring, merged_dir, fingerprint, bool(cfg.pipeline.resume), clock
        )
        clock.lap("train")
        saved = save(trainer, plan, anneal, tokenizer, merged_dir, stage_dir, ranks)
        del trainer
        saved = finish_adapter(saved, anneal, tokenizer, merged_dir, stage_dir, ranks)
        clock.lap("save")
    return records.AnnealRecord(
        inputs=inputs(references, merged_dir, stored, preferences.sources(DataSettings.of(cfg.data, "data"))),
        outputs=saved.outputs(stage_dir, stored.path),
        reference_fingerprint=fingerprint,
        precision=plan.precision.record(),
        config={name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("anneal", "data")},
        memory_plan=plan.memory.record() if plan.memory else None,
        processes=ranks.num_processes,
        distributed_type=saved.engine,
        process={"malloc_keeps_freed_memory": malloc_kept, "gc_skipped_objects": gc_skipped},
        perf={"switches": anneal.perf.model_dump(), "applied": applied_record(applied)},
        saved_for_backward=applied["saved_for_backward"],
        data=stored.counts(dropped),
        cache=stored.cache_record(),
        reference_batch_size=plan.args.precompute_ref_batch_size,
        resumed_from=checkpoint,
        final_log=saved.final,
        seconds_by_phase=clock.seconds,
    )


def applied_record(applied: dict) -> dict:
    """What the perf switches applied in training, for the record."""
    return {
        **{name: bool(applied[name]) for name in ("frozen_base_in_bf16", "float32_attention")},
        "packing": training.packing_record(applied["packing"]),
    }


# ------------------------------------------------------------------------------------------------- phases


def dropped_text(dropped: dict) -> str:
    """The rows dropped, per split and reason, for the log (every reason with a count; none: `none`)."""
    parts = [
        f"{split} {reason.replace('_', ' ')} {count}"
        for split, counts in dropped.items()
        for reason, count in counts.items()
        if count
    ]
    return ", ".join(parts) or "none"


def load_pairs(anneal: AnnealSettings, data: DataSettings, references: refs.References):
    """The preference pairs, the counts of rows dropped, and under `reference_combine=route` each pair's parent
    (checked before any model is loaded)."""
    pairs, dropped = preferences.load_preferences(data, keep=route_column(anneal))
    if anneal.extrapolate:  # extrapolation's validation pairs, carved by prompt from training before it starts
        pairs["train"], pairs["validation"] = preferences.split_by_prompt(
            pairs["train"], anneal.extrapolate_validation, seed=int(anneal.trainer.get("seed", 42))
        )
    routes = refs.route_of(pairs, anneal.reference_route, list(references.sources)) if route_column(anneal) else None
    return pairs, dropped, routes


def route_column(anneal: AnnealSettings) -> tuple[str, ...]:
    """The data column that names each pair's parent under `reference=parents, reference_combine=route`; else none."""
    routed = str(anneal.reference) == "parents" and anneal.reference_combine == "route"
    return (anneal.reference_route,) if routed else ()


def check_vocabularies(tokenizer, merged_dir: Path, references: refs.References) -> None:
    for source in references.sources.values():
        models.check_same_vocabulary(
            tokenizer,
            merged_dir,
            source.path,
            "The reference model",
            "use a parent with the same tokenizer (anneal.reference=auto or a parent name), or merge without "
            "changing the vocabulary.",
        )


@dataclass(frozen=True)
class Plan:
    """What the anneal will do, decided before any model loads: the precision, TRL's DPOConfig (`args`, which the
    reference pass reads too), the trainer's config (`train_args`: `args` for DPO, CPOConfig / ORPOConfig
    otherwise) and the memory plan (None for an architecture it cannot size)."""

    precision: perf.Precision
    args: Any
    train_args: Any
    memory: memory.MemoryPlan | None


def make_plan(anneal: AnnealSettings, merged_dir: Path, stage_dir: Path, sharding: str) -> Plan:
    n_params = models.count_parameters(merged_dir)
    precision = perf.decide_precision(anneal, n_params)
    args = training.dpo_config(anneal, stage_dir / "checkpoints", precision)
    train_args = training.method_config(anneal, args, precision)  # = args for DPO
    weights.check_quantization(anneal)
    plan = memory.for_anneal(anneal, sharding, merged_dir, args, precision, n_params)
    log.info(f"anneal: {plan.describe() if plan else 'no memory plan for this architecture'}")
    if plan and anneal.memory_check:
        memory.check(plan)
    return Plan(precision, args, train_args, plan)


@dataclass(frozen=True)
class Stored:
    """The reference pass's result: the store, the pairs TRL kept with their reference log-probs (`scored`), its
    cache state, and with `parents` each parent's pass."""

    path: Path
    scored: Any
    cache: str
    by_parent: dict | None

    def counts(self, dropped: dict) -> dict:
        return {
            "train_pairs": len(self.scored["train"]),
            "heldout_pairs": len(self.scored["heldout"]),
            "dropped": dropped,
        }

    def cache_record(self) -> dict:
        by_parent = {n: p["cache"] for n, p in self.by_parent.items()} if self.by_parent else None
        return {"reference_logps": self.cache, **({"reference_logps_by_parent": by_parent} if by_parent else {})}


def score_reference(
    scoring: Scoring,
    anneal: AnnealSettings,
    references: refs.References,
    fingerprint: str,
    fingerprints: dict,
    pairs,
    routes,
    dropped: dict,
) -> Stored:
    """Every pair scored by the reference once (cached across runs; split across processes); pairs TRL drops for a
    prompt that fills max_length are counted in `dropped`, never silent."""
    if references.parents:
        path, state, by_parent = parents_reference_logps(
            scoring, references.sources, fingerprints, pairs, anneal.reference_combine, routes
        )
    else:
        (path, state), by_parent = reference_logps(scoring, references.first.path, fingerprint, pairs), None
    scored = preferences.read_store(path)
    for split in scored:
        dropped[split]["prompt_too_long"] = len(pairs[split]) - len(scored[split])
    if dropped["train"]["prompt_too_long"]:
        log.warning(
            f"anneal: {dropped['train']['prompt_too_long']} of {len(pairs['train'])} training pairs have a "
            f"prompt of at least anneal.trainer.max_length={scoring.args.max_length} tokens and are left out"
        )
    log.info(
        f"anneal: {len(scored['train'])} train / {len(scored['heldout'])} held-out pairs; dropped: "
        f"{dropped_text(dropped)}; "
        f"reference {references.label} ({', '.join(s.public_name() for s in references.sources.values())}); "
        f"reference log-probs: cache {state}"
    )
    return Stored(path, scored, state, by_parent)


def train(
    plan: Plan,
    anneal: AnnealSettings,
    train_pairs,
    scoring: Scoring,
    merged_dir: Path,
    fingerprint: str,
    resume: bool,
    clock: perf.PhaseClock,
):
    """Train the merged model against the stored reference log-probs (from the newest checkpoint when resuming).
    Returns the trainer, what the perf switches applied, and the checkpoint resumed from."""
    ranks, stage_dir = scoring.ranks, scoring.stage_dir
    checkpoint = training.last_checkpoint(plan.train_args.output_dir) if resume else None
    if checkpoint is None and ranks.is_main_process:  # a fresh start: no stale checkpoints or metrics
        shutil.rmtree(plan.train_args.output_dir, ignore_errors=True)
        (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
    ranks.wait_for_everyone()
    model = weights.load_policy(merged_dir, anneal, plan.precision.frozen_linear_weights, ranks.local_process_index)
    columns = train_pairs.select_columns([*preferences.COLUMNS, *REF_COLUMNS])  # TRL's columns only
    trainer = training.make_trainer(
        model,
        scoring.tokenizer,
        plan.train_args,
        columns,
        anneal,
        stage_dir,
        perf.known_model_hash(fingerprint, anneal.perf.skip_trl_model_hash),
    )
    with perf.training(trainer, model, plan.precision, anneal.perf) as applied:
        clock.lap("setup")
        trainer.train(resume_from_checkpoint=checkpoint)
    return trainer, applied, checkpoint


@dataclass(frozen=True)
class Saved:
    """What training left: the last log line, the distributed engine, and whether an adapter was saved."""

    final: dict
    engine: str
    adapter: bool

    def outputs(self, stage_dir: Path, store: Path) -> dict:
        return {
            "model": str(stage_dir / "model"),
            "reference_logps": str(store),
            "metrics": str(stage_dir / "metrics.jsonl"),
            **({"adapter": str(stage_dir / "adapter")} if self.adapter else {}),
        }


def save(trainer, plan: Plan, anneal: AnnealSettings, tokenizer, merged_dir: Path, stage_dir: Path, ranks) -> Saved:
    """Full weights (safetensors, with the tokenizer), or LoRA's adapter on its own; non-finite weights never."""
    final = dict(trainer.state.log_history[-1]) if trainer.state.log_history else {}
    engine = trainer.accelerator.distributed_type.value  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathered (FSDP, ZeRO-3) on main
    trained = trainer.accelerator.unwrap_model(trainer.model)
    training.check_finite(trained, trainer.state.global_step, plan.train_args)
    if ranks.is_main_process and anneal.peft is None:
        weights.save_model(trained, tokenizer, stage_dir / "model", state_dict)
    elif ranks.is_main_process:  # PEFT format, safetensors
        publish(stage_dir / "adapter", partial(trained.save_pretrained, state_dict=state_dict))
    return Saved(final, engine, anneal.peft is not None)


def finish_adapter(saved: Saved, anneal: AnnealSettings, tokenizer, merged_dir: Path, stage_dir: Path, ranks) -> Saved:
    """LoRA: the adapter merged into the float32 merged weights, once the trainer and its model are gone."""
    models.release_memory()
    if ranks.is_main_process and saved.adapter:
        weights.save_model(weights.merge_adapter(merged_dir, stage_dir / "adapter"), tokenizer, stage_dir / "model")
    ranks.wait_for_everyone()
    return saved


def inputs(references: refs.References, merged_dir: Path, stored: Stored, data_sources: dict) -> dict:
    """The record's inputs: the merged model, the reference(s) with their provenance, the data's sources."""
    first = references.first
    return {
        "model": str(merged_dir),
        "reference": references.choice if models.is_hub_id(references.choice) or stored.by_parent else first.path,
        "reference_path": first.path,
        "reference_label": references.label,
        "reference_source": first,
        "data": data_sources,
        **({"references": stored.by_parent} if stored.by_parent else {}),
    }
