"""Stage 3, eval: should the annealed model ship? Parents, merged and annealed side by side, with honest statistics.

`run` reads as its phases: load (the records, the held-out pairs with their stored reference log-probs, tokenised as
TRL does; the benchmark suite) -> score (every model once loaded: the pairs' log-probs, KL to the reference on the
chosen answers, perplexity, greedy answers, seeded sampled answers, the benchmarks through lm-eval on the loaded
model; pipeline/scoring.py, stages/eval/benchmarks.py) -> judge (the reward, loaded once the models are released,
scores the sampled answers: win rates; stages/eval/win_rate.py) -> summarize (each model's metrics with bootstrap
intervals, annealed minus merged paired, each parent's skills kept, generation health, the contamination audit and
the verdict; stages/eval/summary.py, contamination.py, verdict.py) -> report (`<run_dir>/eval/metrics.json` as
`records.EvalReport`, `report.md` and its plots, `items.json`: per-item values for paired comparisons between runs;
stages/eval/report.py).
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import UserError, models, preferences, records, scoring
from pipeline.artifacts import publish
from stages.eval import benchmarks, contamination, report, summary, verdict, win_rate
from stages.eval.settings import EvalSettings

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """Every eval setting, before the first stage runs: the block's types, a named text corpus, the benchmark tasks
    (known to lm-eval, their data readable from here), the reward."""
    settings = EvalSettings.of(cfg.eval, "eval")
    if settings.text_corpus not in (None, "auto"):
        text_corpus(settings.text_corpus, None)
    benchmarks.check(settings.benchmarks)
    spec = settings.win_rate.reward
    if spec and ":" in spec and not Path(spec).expanduser().exists():
        win_rate.load_reward(spec)  # a function: imported now; a reward model is loaded after the policies


def run(cfg: DictConfig, run_dir: Path) -> records.EvalRecord:
    """Evaluate the run's models; returns the stage's record."""
    settings = EvalSettings.of(cfg.eval, "eval")
    inputs = load(Path(run_dir), settings)
    started = time.perf_counter()
    per_item, samples = score_models(inputs, settings)
    judged = judge(inputs, per_item, settings)
    results, evaluation = summarize(inputs, per_item, judged, settings, time.perf_counter() - started)
    return write(
        inputs, records.EvalReport.model_validate(evaluation), results, samples, settings, Path(run_dir) / "eval"
    )


# -------------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class Inputs:
    """What eval reads, tokenised once: the records, the models by name, the held-out pairs (their stored reference
    log-probs) and the training pairs, the chosen and rejected sequences, the corpus texts, the prompts shown in
    the report (`shown`), probed for generation health and the win rate (`probed`, with their `raw` prompts), and the
    benchmark suite."""

    merge: records.MergeRecord
    anneal: records.AnnealRecord
    model_dirs: dict[str, Path]
    reference_dir: Path
    heldout: Any
    train: Any
    tokenizer: Any
    chosen: list
    rejected: list
    texts: list | None
    corpus_path: Path | None
    shown: list[str]
    probed: list[str]
    raw: dict
    suite: benchmarks.Suite | None


def load(run_dir: Path, settings: EvalSettings) -> Inputs:
    merge = records.load(run_dir, records.MergeRecord)
    anneal = records.load(run_dir, records.AnnealRecord)
    merged_dir = Path(merge.outputs.model)
    model_dirs = {
        **{f"parent:{Path(p).name}": Path(p) for p in merge.inputs.parents},
        "merged": merged_dir,
        "annealed": Path(anneal.outputs.model),
    }
    store = preferences.read_store(Path(anneal.outputs.reference_logps))
    heldout, tokenizer = store["heldout"], scoring.load_tokenizer(merged_dir)
    max_length, truncation = anneal.trainer.max_length, scoring.truncation_mode(anneal.trainer.truncation_mode)
    tokenized = scoring.tokenize_pairs(tokenizer, heldout, max_length, truncation)
    corpus_path = text_corpus(settings.text_corpus, anneal.config.data.heldout_text)
    texts = [scoring.tokenize_text(tokenizer, t, max_length) for t in read_texts(corpus_path)] if corpus_path else None
    raw = {scoring.prompt_text(tokenizer, p): p for p in heldout["prompt"]}
    prompts = list(raw)
    return Inputs(
        merge,
        anneal,
        model_dirs,
        Path(anneal.inputs.reference_path),
        heldout,
        store["train"],
        tokenizer,
        tokenized["chosen"],
        tokenized["rejected"],
        texts,
        corpus_path,
        scoring.spread(prompts, settings.samples),
        scoring.spread(prompts, settings.generation.prompts or len(prompts)),
        raw,
        benchmarks.prepare(settings.benchmarks, settings.seed),
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
    """One model's per-item values: pair log-probs, KL on the chosen answers, corpus NLLs, sampled answers and their
    health, the benchmarks; and its greedy answers to the shown prompts."""
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
    sampled = scoring.generate(  # batched, left-padded; every model the same batches and seeds
        model,
        inputs.tokenizer,
        inputs.probed,
        settings.max_new_tokens,
        sample=settings.generation.model_dump(),
        batch_size=settings.batch_size,
    )
    items["generation"] = scoring.health(sampled)
    items["answers"] = [
        (inputs.tokenizer.decode(ids, skip_special_tokens=True), len(ids), ended) for ids, ended in sampled
    ]
    if inputs.suite is not None:
        suite = settings.benchmarks
        items["benchmarks"] = benchmarks.run(
            model, inputs.tokenizer, inputs.suite, suite.batch_size or batch_size, suite.num_fewshot
        )
    return items, scoring.greedy_answers(model, inputs.tokenizer, inputs.shown, settings.max_new_tokens)


def judge(inputs: Inputs, per_item: dict, settings: EvalSettings) -> dict | None:
    """The win rates (None without a reward): the reward is loaded now that the policies are released."""
    if not settings.win_rate.reward:
        return None
    reward = win_rate.load_reward(settings.win_rate.reward, settings.win_rate.batch_size)
    prompts = [inputs.raw[p] for p in inputs.probed]
    generations = {name: items["answers"] for name, items in per_item.items()}
    judged = win_rate.evaluate(
        reward, prompts, generations, inputs.heldout, settings.win_rate, settings.bootstrap_resamples, settings.seed
    )
    judged["warning"] = win_rate.labelled_training_data(judged["reward"], inputs.anneal.inputs.data)
    if judged["warning"]:
        log.warning(f"eval: {judged['warning']}")
    del reward
    models.release_memory()
    return judged


def summarize(
    inputs: Inputs, per_item: dict, judged: dict | None, settings: EvalSettings, seconds: float
) -> tuple[dict, dict]:
    """Each model's metrics with intervals, annealed minus merged (paired), the benchmarks and each parent's skills
    kept, generation health, the win rates, the contamination audit, the verdict: the results (with their per-item
    values) and the report's content."""
    import torch

    anneal, heldout = inputs.anneal, inputs.heldout
    ref_chosen, ref_rejected = (torch.tensor(heldout[c]) for c in preferences.REF_COLUMNS)
    results = {
        name: summary.summarize(
            items, name in ("merged", "annealed"), ref_chosen, ref_rejected, anneal.trainer.beta, settings
        )
        for name, items in per_item.items()
    }
    bench = None
    if inputs.suite is not None:
        bench = benchmarks.summarize(
            {n: items["benchmarks"] for n, items in per_item.items()},
            settings.benchmarks.parent_tasks,
            settings.bootstrap_resamples,
            settings.seed,
        )
        summary.add_benchmarks(results, bench)
    comparison = summary.compare(results["annealed"]["items"], results["merged"]["items"], settings)
    if bench is not None:
        comparison["benchmarks"] = bench["annealed_vs_merged"]
    health = summary.generation_report(
        {n: items["generation"] for n, items in per_item.items()}, settings, len(inputs.probed)
    )
    evaluation = {
        "models": {name: r["summary"] for name, r in results.items()},
        "comparison": {"annealed_vs_merged": comparison},
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
        "extrapolation": anneal.extrapolation,
        "benchmarks": summary.benchmarks_section(bench),
        "win_rate": judged,
        "contamination": audit(inputs, per_item),
        "verdict": verdict.decide(
            bench["retention"]["annealed"] if bench else None, judged, settings.verdict.retention_threshold
        ),
    }
    return results, evaluation


def audit(inputs: Inputs, per_item: dict) -> dict:
    """The contamination audit of every kind of eval item against the training pairs."""
    items = {
        "heldout_pairs": [preferences.prompt_key(p) for p in inputs.heldout["prompt"]],
        "win_rate_prompts": [preferences.prompt_key(inputs.raw[p]) for p in inputs.probed],
    }
    if inputs.suite is not None:
        items["benchmark_items"] = [
            text for run in per_item["merged"]["benchmarks"].values() for text in run["texts"].values()
        ]
    found = contamination.audit(inputs.train, items)
    if found["flagged"]:
        log.warning(
            f"eval: eval items overlap the training pairs: exact {found['exact']}, "
            f"13-gram {found['ngram13']} (metrics.json `contamination`)"
        )
    return found


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
    log.info(f"eval: {evaluation.verdict['sentence']}")
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
        summary={
            "annealed_minus_merged_preference_accuracy": evaluation.delta("preference_accuracy"),
            "verdict": evaluation.verdict,
        },
    )


# ------------------------------------------------------------------------------------------------ inputs


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


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
