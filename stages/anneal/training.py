"""TRL's configs and trainer for the anneal stage: TRL's DPOConfig built from `anneal.trainer`, the config of a
reference-free `anneal.method` (CPO, ORPO), the trainer that reads the stored reference log-probs (its class is in
stages/anneal/trainers.py), and the checks around training (weights that stop being finite, the newest complete
checkpoint to resume from).

Heavy libraries (torch, TRL, transformers, PEFT, accelerate) are imported inside the functions: importing this
module stays cheap.
"""

import json
import logging
from pathlib import Path

from pipeline import UserError, preferences
from stages.anneal import perf
from stages.anneal.settings import AnnealSettings

log = logging.getLogger(__name__)

# TRL 1.16's DPO loss types (dpo_trainer.py, `_compute_loss`).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# DPOConfig fields the stage owns: where things are written, and the precomputed reference.
OWNED_FIELDS = {"output_dir", "precompute_ref_log_probs"}
# anneal.method: TRL's reference-free trainers besides DPO (module, config), experimental in TRL 1.16.
METHODS = {"cpo": ("trl.experimental.cpo", "CPOConfig"), "orpo": ("trl.experimental.orpo", "ORPOConfig")}


def dpo_config(anneal: AnnealSettings, output_dir: Path, precision: perf.Precision):
    """TRL's own DPOConfig from `anneal.trainer` (field names unchanged), plus the fields the stage owns; bf16
    as `precision` decided."""
    from trl import DPOConfig

    fields = trainer_fields(anneal.trainer, precision)
    owned = sorted(set(fields) & OWNED_FIELDS)
    if owned:
        raise UserError(f"anneal.trainer.{owned[0]} is set by merge-anneal. Fix: remove it.")
    check_loss_weights(fields.get("loss_type"), fields.get("loss_weights"))
    try:
        args = DPOConfig(output_dir=str(output_dir), precompute_ref_log_probs=True, **fields)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"TRL's DPOConfig rejected anneal.trainer: {err}. Fix: use DPOConfig field names and "
            "values (conf/anneal/dpo.yaml lists the common ones)."
        ) from None
    check_values(args)
    tokens = anneal.perf.reference_pass_tokens
    if args.precompute_ref_batch_size is None and tokens:
        args.precompute_ref_batch_size = perf.reference_batch_size(
            args.per_device_train_batch_size, args.max_length, tokens
        )
    return args


def check_loss_weights(loss_type, loss_weights) -> None:
    """One weight per loss type, or none: the default's [1.0, 0.2] stays behind when only loss_type is changed."""
    loss_type = [loss_type] if isinstance(loss_type, str) else list(loss_type or [])
    if loss_weights is not None and len(loss_weights) != len(loss_type):
        raise UserError(
            f"anneal.trainer.loss_weights has {len(loss_weights)} weights ({list(loss_weights)}) for "
            f"{len(loss_type)} loss type(s) ({loss_type}). Fix: one weight per loss type, or "
            "anneal.trainer.loss_weights=null (1 each); the default weights [1.0, 0.2] belong to the default "
            "loss_type [sigmoid, sft]."
        )


def check_values(args) -> None:
    """What DPOConfig takes but training would refuse, or quietly get wrong."""
    unknown = [name for name in args.loss_type if name not in LOSS_TYPES]
    if unknown:
        raise UserError(
            f"Unknown DPO loss type(s) {unknown}. Fix: use TRL's loss types: {', '.join(LOSS_TYPES)}, "
            "e.g. anneal.trainer.loss_type=[sigmoid]."
        )
    if args.beta <= 0:
        raise UserError(
            f"anneal.trainer.beta must be positive (got {args.beta}): it scales the implicit "
            "reward. Fix: e.g. anneal.trainer.beta=0.1."
        )
    if args.learning_rate <= 0:  # torch's optimizers refuse it, but only once training starts
        raise UserError(
            f"anneal.trainer.learning_rate must be positive (got {args.learning_rate:g}). Fix: e.g. "
            "anneal.trainer.learning_rate=1e-6 (TRL's default for full fine-tuning)."
        )


def trainer_fields(trainer: dict, precision: perf.Precision) -> dict:
    """`anneal.trainer` as a dict, with bf16 as `precision` decided (and use_cpu where that means CPU)."""
    import torch
    from accelerate.utils import parse_flag_from_env

    fields = dict(trainer)
    fields["bf16"] = precision.autocast == "bfloat16"
    if (fields["bf16"] and not torch.cuda.is_available()) or parse_flag_from_env("ACCELERATE_USE_CPU"):
        fields.setdefault("use_cpu", True)  # bf16 on CPU is meant; CPU processes under accelerate launch
    return fields


def method_config(anneal: AnnealSettings, dpo_args, precision: perf.Precision):
    """The training config of `anneal.method`: `dpo_args` for DPO; for a reference-free method, TRL's own
    CPOConfig / ORPOConfig from `anneal.method_args` and the Trainer fields of `anneal.trainer`."""
    import dataclasses
    import importlib

    from transformers import TrainingArguments

    from stages.anneal.trainers import LENGTH_SAMPLERS

    method, method_args = anneal.method, dict(anneal.method_args)
    if method == "dpo":
        if method_args:
            raise UserError(
                f"anneal.method_args {sorted(method_args)} are set but anneal.method=dpo takes its fields "
                "from anneal.trainer. Fix: move them to anneal.trainer, or choose anneal.method=cpo/orpo."
            )
        return dpo_args
    module, config_name = METHODS[method]
    config_class = getattr(importlib.import_module(module), config_name)
    shared = {f.name for f in dataclasses.fields(TrainingArguments)} | {"max_length"}  # what means the same there
    fields = {k: v for k, v in trainer_fields(anneal.trainer, precision).items() if k in shared}
    if fields.get("train_sampling_strategy") in LENGTH_SAMPLERS:  # needs a length column those trainers drop
        log.info(
            f"anneal: {method} trains on random batches (train_sampling_strategy="
            f"{fields['train_sampling_strategy']} is for DPO)"
        )
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
        raise UserError(
            f"TRL's {config_name} rejected anneal.method_args: {err}. Fix: use {config_name} field "
            f"names and values (see conf/anneal/dpo.yaml and conf/anneal_variant/)."
        ) from None
    return args


def lora_config(anneal: AnnealSettings):
    """PEFT's LoraConfig from `anneal.peft` (None: every weight trains)."""
    if anneal.peft is None:
        return None
    from peft import LoraConfig

    try:
        return LoraConfig(**anneal.peft)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"PEFT's LoraConfig rejected anneal.peft: {err}. Fix: use LoraConfig field names and values "
            "(conf/anneal/lora.yaml)."
        ) from None


def make_trainer(model, tokenizer, args, train_dataset, anneal: AnnealSettings, stage_dir: Path, trl_model_hash):
    """TRL's DPOTrainer reading the reference log-probs from the dataset's columns (no reference model is loaded
    or kept); with `anneal.method` cpo or orpo, that reference-free trainer on the pairs alone. Training stops at a
    loss that is not finite."""
    from stages.anneal import trainers

    callbacks = [trainers.JsonlLogger(stage_dir / "metrics.jsonl")]
    if anneal.method in trainers.REFERENCE_FREE:
        trainer = trainers.REFERENCE_FREE[anneal.method](
            model=model,
            args=args,
            train_dataset=train_dataset.select_columns(preferences.COLUMNS),
            processing_class=tokenizer,
            peft_config=lora_config(anneal),
            callbacks=callbacks,
        )
        return trainers.TrainingProgress.install(trainer)
    with trl_model_hash:  # TRL names its (unused) precompute cache by a hash of the model
        trainer = trainers.PrecomputedReferenceDPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=lora_config(anneal),
            callbacks=callbacks,
        )
    return trainers.TrainingProgress.install(trainer)


def packing_record(counts: dict | None) -> dict | None:
    """What packing saved in training: rows and token positions computed, padded against packed."""
    if counts is None:
        return None
    share = 1 - counts["packed_positions"] / counts["positions"] if counts["positions"] else 0.0
    return {
        "rows": counts["rows"],
        "packed_rows": counts["packed_rows"],
        "positions": counts["positions"],
        "packed_positions": counts["packed_positions"],
        "positions_saved": round(share, 4),
        "switched_off": counts["off"],
    }


def check_finite(model, step: int, args) -> None:
    """Non-finite weights are never saved (a step can turn them NaN with a finite loss, e.g. the last one)."""
    import torch

    from stages.anneal.trainers import diverged

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
