"""Every subclass of TRL's and transformers' classes the anneal stage uses, at module level: the one file to read
when TRL is upgraded. It imports TRL at its top, so it is imported only when an anneal runs (inside the stage's
functions): `python -m pipeline --help` and the settings checks stay cheap.

- `PrecomputedReferenceDPOTrainer`: TRL's DPOTrainer reading the reference log-probs from the data set's columns
  (the stored reference pass) instead of computing them: no reference model is loaded or kept (TRL 1.16 has no
  option for log-probs computed elsewhere); lengths for length-grouped batches.
- `StoppingCPOTrainer`, `StoppingORPOTrainer`: TRL's reference-free trainers (trl.experimental, TRL 1.16).
- each of them stops at the step whose loss is not finite (`StopsWhenNotFinite`);
- `ScoringTrainer`: TRL's own precompute as the reference pass (stages/anneal/reference_pass.py), packed where
  asked, its pairs then met shortest first;
- `JsonlLogger`: every training log as one JSON line, from the main process;
- `TrainingProgress`: the console's one training bar (steps, ETA, the last loss, reward accuracy and margin) in
  place of transformers' bar and its printed log dicts, and each log as one line in the run's log file.
"""

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import DPOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from pipeline import UserError, preferences
from pipeline.logs import to_log_file
from pipeline.preferences import REF_COLUMNS
from stages.anneal import packing

# transformers' samplers that read a length per row (TrainingArguments.train_sampling_strategy).
LENGTH_SAMPLERS = ("group_by_length", "batch_rebalance")


def diverged(what: str, step: int, args) -> str:
    return (
        f"Training diverged: {what} at step {step}, so no weights were saved. Fix: a lower "
        f"anneal.trainer.learning_rate (now {args.learning_rate:g}), gradient clipping "
        f"(anneal.trainer.max_grad_norm, now {args.max_grad_norm}), or a smaller beta (now {args.beta:g})."
    )


class StopsWhenNotFinite:
    """A trainer mixin: a loss that stops being finite stops training at that step, with the fixes."""

    method = "dpo"  # anneal.method, for the message

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss):
            raise UserError(
                diverged(f"the {self.method.upper()} loss became {loss.item()}", self.state.global_step + 1, self.args)
            )
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


class StoppingCPOTrainer(StopsWhenNotFinite, CPOTrainer):
    method = "cpo"


class StoppingORPOTrainer(StopsWhenNotFinite, ORPOTrainer):
    method = "orpo"


REFERENCE_FREE = {"cpo": StoppingCPOTrainer, "orpo": StoppingORPOTrainer}


class ScoringTrainer(DPOTrainer):
    """TRL's precompute of the reference log-probs as a pass of its own: `pack` packs each batch's rows
    (stages/anneal/packing.py); `pairs_given` (split -> pairs before TRL's filtering) names what an empty split lost."""

    def __init__(self, *args, pack: bool, pairs_given: dict[str, int], **kwargs):
        self.pack, self.pairs_given = pack, pairs_given
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if len(dataset) == 0:  # TRL would fail on an empty concatenation
            split = "train" if name == "train" else "heldout"
            raise UserError(
                f"Every one of the {self.pairs_given[split]} {split} pairs has a prompt (with the chat template's "
                f"system prompt and generation prompt, where the data is conversational) of at least "
                f"anneal.trainer.max_length={self.args.max_length} tokens, so TRL drops them all and nothing is left "
                f"to {'train on' if split == 'train' else 'evaluate'}. Fix: raise anneal.trainer.max_length "
                "(e.g. 1024 or 2048 for chat models), or shorten the prompts."
            )
        if not self.pack:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # packed, the pass also meets its pairs shortest first (packing.py says why): each batch holds pairs of
        # about one length, so its rows pack with little padding left; the result goes back to the order given
        order = packing.shortest_first(preferences.padded_lengths(dataset, self.args.max_length))
        with packing.packed(self.model, True):
            scored = super()._precompute_ref_logps(dataset.select(order).flatten_indices(), name, batch_size)
        return scored.select(packing.inverse(order))


class JsonlLogger(TrainerCallback):
    """Every training log (loss, rewards/*, logps/*) as one JSON line of `path`, from the main process only."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class TrainingProgress(TrainerCallback):
    """One progress bar on the main process (`disable_tqdm` hides it) showing the last loss, reward accuracy and
    margin; every log (TRL's dict, which transformers would print) as one line in the run's log file instead."""

    SHOWN = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin"}
    LOGGED = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate", "epoch")

    def __init__(self):
        self.bar = None

    @staticmethod
    def install(trainer):
        """`trainer` with this bar instead of transformers' (ProgressCallback, or PrinterCallback's dicts)."""
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(TrainingProgress())
        return trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            total, done = state.max_steps, state.global_step
            self.bar = tqdm(total=total, initial=done, desc="anneal: training", unit="step", disable=args.disable_tqdm)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        numbers = {key: number(value) for key, value in logs.items() if number(value) is not None}
        if self.bar is not None:
            shown = {short: f"{numbers[key]:.4g}" for key, short in self.SHOWN.items() if key in numbers}
            self.bar.set_postfix(shown, refresh=False)
        summary = {key: numbers[key] for key in self.LOGGED if key in numbers} or numbers  # the final log: all
        text = ", ".join(f"{key} {value:.4g}" for key, value in summary.items())
        to_log_file(logging.INFO, f"anneal: step {state.global_step}/{state.max_steps}: {text}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def number(value) -> float | None:
    """A logged value as a float (transformers 5 logs some as formatted strings), or None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
