"""Extrapolation (ExPO, arXiv 2404.16792): the annealed model pushed further along its own update,
theta = merged + alpha x (annealed - merged), for each alpha of `anneal.extrapolate`, chosen on validation data.

Each candidate is built by mergekit (task_arithmetic with the merge as its base and the annealed model at weight
alpha, float32 arithmetic, written in the annealed model's dtype); each is scored by preference accuracy on a
validation split carved by prompt from the training pairs before training (`anneal.extrapolate_validation`), never
the held-out split eval reports on. alpha 1.0 is the annealed model itself, always a candidate and never rebuilt,
so on validation the choice can only match or beat plain annealing; a tie goes to the alpha nearest 1.0. The cost:
one merge and one scoring pass per alpha, no training. Every alpha's score is recorded; the chosen model replaces
`anneal/model` (the plain annealed one is kept at `anneal/model-alpha-1`).
"""

import logging
import shutil
from pathlib import Path

from pipeline import scoring

log = logging.getLogger(__name__)


def candidates(alphas) -> list[float]:
    """The alphas to try (above 0: AnnealSettings checks), 1.0 (the annealed model) always among them, ascending."""
    return sorted({1.0, *(float(a) for a in alphas)})


def choose(scores: dict[float, float]) -> float:
    """The best-scoring alpha; among equal scores, the one nearest 1.0 (then the smaller)."""
    return max(scores, key=lambda a: (scores[a], -abs(a - 1.0), -a))


def validation_accuracy(model_dir: Path, pairs, max_length: int, truncation: str, batch_size: int) -> float:
    """Share of `pairs` whose chosen answer the model at `model_dir` gives the higher summed log-prob."""
    return float(scoring.chosen_preferred(model_dir, pairs, max_length, truncation, batch_size).float().mean())


def build(merged_dir: Path, annealed_dir: Path, alpha: float, out: Path) -> Path:
    """merged + alpha x (annealed - merged), by mergekit's task_arithmetic, in float32, written as the annealed
    model's dtype, the merge's tokenizer (the annealed model's: the anneal never changes it) copied."""
    import json

    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    dtype = json.loads((annealed_dir / "config.json").read_text()).get("dtype") or "float32"
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(merged_dir),
            "models": [{"model": str(annealed_dir), "parameters": {"weight": alpha}}],
            "parameters": {"normalize": False},
            "dtype": "float32",
            "out_dtype": dtype,
        }
    )
    options = MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, cuda=torch.cuda.is_available())
    run_merge(config, str(out), options=options)
    return out


def extrapolate(alphas, merged_dir: Path, annealed_dir: Path, validation, stage_dir: Path, trainer, batch_size: int):
    """Try every alpha, keep the best at `annealed_dir`; returns the record (every alpha's validation accuracy,
    the chosen one, the validation pairs). `trainer`: anneal.trainer, whose max_length and truncation_mode the
    scoring follows."""
    work = stage_dir / "extrapolated"
    shutil.rmtree(work, ignore_errors=True)
    truncation, max_length = scoring.truncation_mode(trainer.get("truncation_mode")), trainer["max_length"]
    scores, folders = {}, {}
    for alpha in candidates(alphas):
        folder = annealed_dir if alpha == 1.0 else build(merged_dir, annealed_dir, alpha, work / f"alpha-{alpha:g}")
        folders[alpha] = folder
        scores[alpha] = validation_accuracy(folder, validation, max_length, truncation, batch_size)
    best = choose(scores)
    log.info(
        "anneal: extrapolation on %d validation pairs: %s; kept alpha %g",
        len(validation),
        ", ".join(f"alpha {a:g} {s:.3f}" for a, s in scores.items()),
        best,
    )
    if best != 1.0:
        annealed_dir.rename(stage_dir / "model-alpha-1")
        folders[best].rename(annealed_dir)
    shutil.rmtree(work, ignore_errors=True)
    return {"alphas": {f"{a:g}": s for a, s in scores.items()}, "chosen": best, "validation_pairs": len(validation)}
