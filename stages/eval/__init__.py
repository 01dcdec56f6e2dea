"""Stage 3, eval: parents vs merged vs annealed on the held-out pairs, with bootstrap intervals.

`run` reads as its phases: load (the records, the held-out pairs with their stored reference log-probs, tokenised
as TRL does) -> score (every model: the pairs' log-probs, KL to the reference on the chosen answers, perplexity,
greedy answers, sampled generations; pipeline/scoring.py) -> summarize (each model's metrics with bootstrap
intervals, annealed minus merged paired, retention, generation health; stages/eval/summary.py) -> report
(`<run_dir>/eval/metrics.json` as `records.EvalReport`, `report.md` and its plots, `items.json`: per-item values for
paired comparisons between runs; stages/eval/report.py).

Metrics per model: preference accuracy (raw and length-normalised), KL to the reference, perplexity, skill exact
match by greedy generation (where the data defines exact answers, i.e. the demo), and for merged / annealed the
DPO implicit reward accuracy and margin against the stored reference log-probs.
"""

import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import UserError, models, preferences, records, scoring
from pipeline import metrics as M
from pipeline.artifacts import publish
from stages.eval import harness, report, summary
from stages.eval.settings import EvalSettings

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """Every eval setting, before the first stage runs: the block's types, a named text corpus, lm-eval's tasks."""
    settings = EvalSettings.of(cfg.eval, "eval")
    if settings.text_corpus not in (None, "auto"):
        text_corpus(settings.text_corpus, None)
    if settings.lm_eval:
        harness.check(settings.lm_eval)


def run(cfg: DictConfig, run_dir: Path) -> records.EvalRecord:
    """Evaluate the run's models; returns the stage's record."""
    settings = EvalSettings.of(cfg.eval, "eval")
    inputs = load(Path(run_dir), settings)
    started = time.perf_counter()
    per_item, samples = score_models(inputs, settings)
    results, evaluation = summarize(inputs, per_item, settings, time.perf_counter() - started)
    if settings.lm_eval:
        evaluation["lm_eval"] = harness.run_lm_eval(settings.lm_eval, inputs.model_dirs)
    return write(
        inputs, records.EvalReport.model_validate(evaluation), results, samples, settings, Path(run_dir) / "eval"
    )


# -------------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class Inputs:
    """What eval reads, tokenised once: the records, the models by name, the held-out pairs (their stored reference
    log-probs), the chosen and rejected sequences, the corpus texts, the prompts with exact answers, the prompts
    shown in the report (`shown`) and probed for generation health (`probed`)."""

    merge: records.MergeRecord
    anneal: records.AnnealRecord
    model_dirs: dict[str, Path]
    reference_dir: Path
    heldout: Any
    tokenizer: Any
    chosen: list
    rejected: list
    texts: list | None
    corpus_path: Path | None
    answers: dict[str, dict[str, str]]
    shown: list[str]
    probed: list[str]


def load(run_dir: Path, settings: EvalSettings) -> Inputs:
    merge = records.load(run_dir, records.MergeRecord)
    anneal = records.load(run_dir, records.AnnealRecord)
    merged_dir = Path(merge.outputs.model)
    model_dirs = {
        **{f"parent:{Path(p).name}": Path(p) for p in merge.inputs.parents},
        "merged": merged_dir,
        "annealed": Path(anneal.outputs.model),
    }
    heldout = preferences.read_store(Path(anneal.outputs.reference_logps))["heldout"]
    tokenizer = scoring.load_tokenizer(merged_dir)
    max_length, truncation = anneal.trainer.max_length, scoring.truncation_mode(anneal.trainer.truncation_mode)
    tokenized = {
        answer: [
            scoring.tokenize_completion(tokenizer, r["prompt"], r[answer], max_length, truncation) for r in heldout
        ]
        for answer in ("chosen", "rejected")
    }
    corpus_path = text_corpus(settings.text_corpus, anneal.config.data.heldout_text)
    texts = [scoring.tokenize_text(tokenizer, t, max_length) for t in read_texts(corpus_path)] if corpus_path else None
    prompts = list(dict.fromkeys(scoring.prompt_text(tokenizer, r["prompt"]) for r in heldout))
    return Inputs(
        merge,
        anneal,
        model_dirs,
        Path(anneal.inputs.reference_path),
        heldout,
        tokenizer,
        tokenized["chosen"],
        tokenized["rejected"],
        texts,
        corpus_path,
        exact_answers(prompts, anneal.config.data.answer_key),
        scoring.spread(prompts, settings.samples),
        scoring.spread(prompts, settings.generation.prompts or len(prompts)),
    )


def score_models(inputs: Inputs, settings: EvalSettings) -> tuple[dict, dict]:
    """Every model in turn (the reference alongside, for KL): per-item scores and its greedy sample answers."""
    import torch

    merged_dir, reference_dir, tokenizer = Path(inputs.merge.outputs.model), inputs.reference_dir, inputs.tokenizer
    per_item, samples = {}, {}
    with torch.no_grad():
        reference = scoring.load_model(reference_dir)
        for name, model_dir in inputs.model_dirs.items():
            models.check_same_vocabulary(
                tokenizer, merged_dir, model_dir, f"Model {name}", "evaluate models that share one tokenizer."
            )
            model = reference if model_dir.resolve() == reference_dir.resolve() else scoring.load_model(model_dir)
            per_item[name], samples[name] = score_model(model, reference, inputs, settings)
            if model is not reference:
                del model
            models.release_memory()
        del reference
        models.release_memory()
    return per_item, samples


def score_model(model, reference, inputs: Inputs, settings: EvalSettings) -> tuple[dict, list[str]]:
    """One model's per-item values: pair log-probs, KL on the chosen answers, corpus NLLs, skill exact match,
    generation health; and its greedy answers to the shown prompts."""
    import torch

    pad_id, batch_size = inputs.tokenizer.pad_token_id or 0, settings.batch_size
    other = None if model is reference else reference  # KL to the reference, on the chosen answers
    chosen = scoring.score(model, inputs.chosen, batch_size, pad_id, reference=other)
    rejected = scoring.score(model, inputs.rejected, batch_size, pad_id)
    items = {
        "chosen_logps": chosen["logps"],
        "rejected_logps": rejected["logps"],
        "chosen_mean_logps": chosen["mean_logps"],
        "chosen_tokens": chosen["tokens"],
        "rejected_mean_logps": rejected["mean_logps"],
        "kl": chosen["kl"] if "kl" in chosen else torch.zeros_like(chosen["logps"]),
    }
    corpus = chosen if inputs.texts is None else scoring.score(model, inputs.texts, batch_size, pad_id)
    items["nll"], items["nll_tokens"] = -corpus["logps"], corpus["tokens"]  # perplexity: corpus, else chosen
    asked = sorted({p for by_prompt in inputs.answers.values() for p in by_prompt} | set(inputs.shown))
    generated = dict(zip(asked, scoring.greedy_answers(model, inputs.tokenizer, asked, settings.max_new_tokens)))
    items["skill_correct"] = {
        skill: [float(generated[p] == answer) for p, answer in by_prompt.items()]
        for skill, by_prompt in inputs.answers.items()
    }
    items["generation"] = scoring.health(
        scoring.generate(
            model, inputs.tokenizer, inputs.probed, settings.max_new_tokens, sample=settings.generation.model_dump()
        )
    )
    return items, [generated[p] for p in inputs.shown]


def summarize(inputs: Inputs, per_item: dict, settings: EvalSettings, seconds: float) -> tuple[dict, dict]:
    """Each model's metrics with intervals, retention of each parent's own skill, annealed minus merged (paired),
    generation health: the results (with their per-item values) and the report's content."""
    import torch

    anneal, heldout = inputs.anneal, inputs.heldout
    ref_chosen, ref_rejected = (torch.tensor(heldout[c]) for c in preferences.REF_COLUMNS)
    results = {
        name: summary.summarize(
            items, name in ("merged", "annealed"), ref_chosen, ref_rejected, anneal.trainer.beta, settings
        )
        for name, items in per_item.items()
    }
    own = own_skills(settings.parent_skills, [Path(p).name for p in inputs.merge.inputs.parents], list(inputs.answers))
    for name, result in results.items():  # each parent's own skill kept, where the data says which it is
        if own and not name.startswith("parent:"):
            value, ci = M.retention(
                per_item[name]["skill_correct"],
                {p: per_item[f"parent:{p}"]["skill_correct"] for p in own},
                own,
                settings.bootstrap_resamples,
                settings.seed,
            )
            result["summary"]["retention"], result["summary"]["ci95"]["retention"] = value, ci
    health = summary.generation_report(
        {name: items["generation"] for name, items in per_item.items()}, settings, len(inputs.probed)
    )
    return results, {
        "models": {name: r["summary"] for name, r in results.items()},
        "comparison": {
            "annealed_vs_merged": summary.compare(results["annealed"]["items"], results["merged"]["items"], settings)
        },
        "heldout_pairs": len(heldout),
        # the DPO reference (rewards use its stored log-probs) and the model KL is measured against
        "reference": {
            "anneal": anneal.inputs.reference_label,
            "kl_to": reference_kl_name(anneal, inputs.reference_dir),
            **({"parents": list(anneal.inputs.references)} if anneal.inputs.references else {}),
        },
        "perplexity_on": str(inputs.corpus_path) if inputs.corpus_path else "heldout chosen completions",
        "beta": anneal.trainer.beta,
        "bootstrap": {"resamples": settings.bootstrap_resamples, "seed": settings.seed, "confidence": 0.95},
        "generation": health,
        "scoring_seconds": round(seconds, 3),
    }


def write(
    inputs: Inputs,
    evaluation: records.EvalReport,
    results: dict,
    samples: dict,
    settings: EvalSettings,
    stage_dir: Path,
) -> records.EvalRecord:
    """metrics.json, items.json, report.md and the plots, published together; the table on the console."""
    training_log = Path(inputs.anneal.outputs.metrics)
    items = summary.item_values(results, inputs.heldout, inputs.texts)
    publish(stage_dir, lambda tmp: report.write_outputs(tmp, evaluation, training_log, inputs.shown, samples, items))
    log.info(report.comparison_table(evaluation))
    return records.EvalRecord(
        inputs={
            "models": {name: str(d) for name, d in inputs.model_dirs.items()},
            "reference": str(inputs.reference_dir),
            "reference_logps": inputs.anneal.outputs.reference_logps,
            "text_corpus": str(inputs.corpus_path) if inputs.corpus_path else None,
            "training_log": str(training_log),
        },
        outputs={
            "metrics": str(stage_dir / "metrics.json"),
            "report": str(stage_dir / "report.md"),
            "plots": [str(stage_dir / name) for name in report.PLOTS],
            "items": str(stage_dir / "items.json"),
        },
        config={"eval": settings.model_dump(mode="json")},
        summary={"annealed_minus_merged_preference_accuracy": evaluation.delta("preference_accuracy")},
    )


# ------------------------------------------------------------------------------------------------ inputs


def own_skills(setting, parents: list[str], skills: list[str]) -> dict:
    """Which skill is each parent's own (parent name -> skill), for retention: `eval.parent_skills` as given, or
    (`auto`) every parent whose folder name is a skill of the data's answer key (the demo's add and reverse)."""
    if setting in (None, "auto"):
        return {p: p for p in parents if p in skills}
    own = dict(setting)
    wrong = {p: s for p, s in own.items() if p not in parents or s not in skills}
    if wrong:
        raise UserError(
            f"eval.parent_skills names {wrong}, but the parents are {parents} and the data's skills "
            f"{skills}. Fix: map each parent's folder name to its skill, e.g. "
            f"eval.parent_skills='{{{parents[0]}: {skills[0] if skills else 'skill'}}}', or auto."
        )
    return own


def reference_kl_name(anneal: records.AnnealRecord, reference_dir: Path) -> str:
    """The model KL to the reference is measured against: the reference, or with `anneal.reference=parents` (whose
    combined log-probs are no single model's) the first parent."""
    if anneal.inputs.references:
        return f"parent:{reference_dir.name} (the first of the parents the reference combines)"
    return anneal.inputs.reference_label if anneal.inputs.reference_label == "merged" else str(reference_dir.name)


def text_corpus(choice, heldout_text: str | None) -> Path | None:
    """`auto`: the held-out text corpus that came with the data (`data.heldout_text`), else none (chosen
    completions)."""
    if choice is None:
        return None
    if choice == "auto":
        return Path(heldout_text) if heldout_text else None
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UserError(
            f"eval.text_corpus={choice} is not a file. Fix: pass a .jsonl file with a `text` field, "
            "auto, or null (perplexity on the held-out chosen completions)."
        )
    return path


def exact_answers(prompts: list[str], answer_key: str | None) -> dict[str, dict[str, str]]:
    """{skill: {prompt: exact answer}} where the data config names an answer key (`data.answer_key`,
    `module.function(prompt) -> (skill, answer) | None`) and it knows every prompt; else {}."""
    if not answer_key:
        return {}
    module_name, _, function = answer_key.rpartition(".")
    try:
        key = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(
            f"data.answer_key={answer_key} cannot be imported ({err}). Fix: name a function as "
            "module.function (e.g. pipeline.demo.tasks.answer_key), or set data.answer_key=null."
        ) from None
    by_skill: dict[str, dict[str, str]] = {}
    for prompt in prompts:
        found = key(prompt)
        if found is None:
            return {}
        skill, answer = found
        by_skill.setdefault(skill, {})[prompt] = answer
    return by_skill


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
