"""The eval stage's numbers from per-item scores: each model's metrics with bootstrap intervals, annealed minus
merged paired, generation health, and the per-item values other runs compare against. Pure: tensors and lists in,
dicts out."""

import hashlib
import json
import math

from pipeline import metrics as M
from pipeline import preferences
from stages.eval.settings import EvalSettings

# Per-item metrics: each has one value per held-out pair, so they get bootstrap intervals.
PAIR_METRICS = ("preference_accuracy", "preference_accuracy_normalized", "kl_to_reference")
REWARD_METRICS = ("reward_accuracy", "reward_margin")


def summarize(items: dict, with_rewards: bool, ref_chosen, ref_rejected, beta: float, settings: EvalSettings) -> dict:
    """A model's metrics and their bootstrap intervals; keeps the per-item values for comparisons."""
    per_item = {
        "preference_accuracy": M.preference_correct(items["chosen_logps"], items["rejected_logps"]),
        "preference_accuracy_normalized": M.preference_correct(
            items["chosen_mean_logps"], items["rejected_mean_logps"]
        ),
        "kl_to_reference": items["kl"],
    }
    summary = {name: float(values.mean()) for name, values in per_item.items()}
    ci = {
        name: M.bootstrap_ci(values.numpy(), settings.bootstrap_resamples, settings.seed)
        for name, values in per_item.items()
    }
    tokens = items["nll_tokens"].clamp(min=1)
    summary["perplexity"] = M.perplexity(float(items["nll"].sum()), int(items["nll_tokens"].sum()))
    lo, hi = M.bootstrap_ci(
        (items["nll"] / tokens).numpy(),
        settings.bootstrap_resamples,
        settings.seed,
        weights=items["nll_tokens"].numpy(),
    )
    ci["perplexity"] = [math.exp(lo), math.exp(hi)]
    # Always also on the held-out chosen completions (the answer part), whatever the corpus.
    summary["perplexity_heldout_chosen"] = M.perplexity(
        -float(items["chosen_logps"].sum()), int(items["chosen_tokens"].sum())
    )
    lo, hi = M.bootstrap_ci(
        (-items["chosen_logps"] / items["chosen_tokens"].clamp(min=1)).numpy(),
        settings.bootstrap_resamples,
        settings.seed,
        weights=items["chosen_tokens"].numpy(),
    )
    ci["perplexity_heldout_chosen"] = [math.exp(lo), math.exp(hi)]
    if with_rewards:
        margins = M.reward_margins(items["chosen_logps"], items["rejected_logps"], ref_chosen, ref_rejected, beta)
        per_item["reward_accuracy"] = (margins > 0).float()
        per_item["reward_margin"] = margins
        summary["reward_accuracy"] = per_item["reward_accuracy"].mean().item()
        summary["reward_margin"] = margins.mean().item()
        ci["reward_accuracy"] = M.bootstrap_ci(
            per_item["reward_accuracy"].numpy(), settings.bootstrap_resamples, settings.seed
        )
        ci["reward_margin"] = M.bootstrap_ci(margins.numpy(), settings.bootstrap_resamples, settings.seed)
    summary["ci95"] = ci
    return {"summary": summary, "items": {**per_item, "nll": items["nll"], "nll_tokens": items["nll_tokens"]}}


def add_benchmarks(results: dict, bench: dict) -> None:
    """Each model's benchmark scores (and for the merged and annealed model the retention of each parent's skills)
    into its summary, with their intervals; each task's per-item values, ordered by document, into its items."""
    for name, result in results.items():
        result["summary"]["benchmarks"] = bench["scores"][name]
        result["summary"]["ci95"]["benchmarks"] = bench["ci95"][name]
        result["items"]["benchmarks"] = bench["items"][name]
        if name in bench["retention"]:
            kept = bench["retention"][name]
            result["summary"]["retention"], result["summary"]["ci95"]["retention"] = kept["value"], kept["ci95"]


def benchmarks_section(bench: dict | None) -> dict | None:
    """The report's `benchmarks`: the tasks (metric, items, chance), each parent's own tasks, merged minus each
    parent per task (paired), the documents that could not be paired."""
    if bench is None:
        return None
    return {key: bench[key] for key in ("tasks", "parent_tasks", "merged_vs_parents", "unmatched")}


def generation_report(items: dict, settings: EvalSettings, n_prompts: int) -> dict:
    """Generation health per model (each measure's mean over the probed prompts with a bootstrap interval) and
    annealed minus merged (paired); fewer generations ending with EOS, or more repetition (lower distinct-2), with
    the interval below 0 is flagged a regression."""
    boot = lambda v: M.bootstrap_ci(v, settings.bootstrap_resamples, settings.seed)
    models = {
        name: {**{k: float(sum(v) / len(v)) for k, v in h.items()}, "ci95": {k: boot(v) for k, v in h.items()}}
        for name, h in items.items()
    }
    versus = {}
    for key in items["annealed"]:
        delta = M.paired_bootstrap(
            items["annealed"][key], items["merged"][key], settings.bootstrap_resamples, settings.seed
        )
        versus[key] = {**delta, "regression": key != "length" and delta["ci95"][1] < 0}
    return {
        "prompts": n_prompts,
        "max_new_tokens": settings.max_new_tokens,
        "sampling": settings.generation.model_dump(),
        "models": models,
        "annealed_vs_merged": versus,
    }


def compare(a: dict, b: dict, settings: EvalSettings) -> dict:
    """a minus b over the same held-out pairs: paired bootstrap per per-item metric."""
    boot = lambda x, y: M.paired_bootstrap(x, y, settings.bootstrap_resamples, settings.seed)
    out = {name: boot(a[name].numpy(), b[name].numpy()) for name in (*PAIR_METRICS, *REWARD_METRICS)}
    out["perplexity"] = M.paired_bootstrap_perplexity(
        a["nll"].numpy(), b["nll"].numpy(), a["nll_tokens"].numpy(), settings.bootstrap_resamples, settings.seed
    )
    return out


def item_values(results: dict, heldout, texts) -> dict:
    """Every model's per-item values (one per held-out pair, per corpus text, per benchmark document), so runs that
    share `key` (the same held-out pairs and texts) can be compared item by item (pipeline/sweep.py); benchmark
    values are compared where two runs answered the same documents (`benchmark_docs`)."""
    key = hashlib.sha256(
        json.dumps(
            [preferences.rows_fingerprint(heldout.select_columns(["prompt", "chosen", "rejected"])), texts]
        ).encode()
    ).hexdigest()[:32]
    as_list = lambda v: v.tolist() if hasattr(v, "tolist") else v
    annealed = results["annealed"]["items"].get("benchmarks", {})
    return {
        "key": key,
        "benchmark_docs": {task: [f"{doc}:{h}" for doc, h in run["docs"]] for task, run in annealed.items()},
        "models": {
            name: {metric: as_list(values) for metric, values in r["items"].items()} for name, r in results.items()
        },
    }
