"""Stage 3, eval: parents vs merged vs annealed on the held-out pairs, with bootstrap intervals.

Every model (each merge parent, the merged and the annealed model) scores the held-out preference pairs in
batched no-grad forwards (TRL's tokenisation: completion = prompt+completion+EOS after the shared prefix),
next to the anneal reference for KL. Metrics per model: preference accuracy (raw and length-normalised),
KL to the reference, perplexity, skill exact match by greedy generation (where the data defines exact
answers, i.e. the demo), and for merged / annealed the DPO implicit reward accuracy and margin against the
stored reference log-probs. Annealed minus merged gets a paired bootstrap interval per per-item metric.
Output: `<run_dir>/eval/metrics.json`, `report.md` and its PNG plots, and `items.json` (per-item values, for
paired comparisons between runs).
"""

import hashlib
import importlib
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, models, preferences, records
from pipeline import metrics as M
from pipeline.artifacts import publish

log = logging.getLogger(__name__)

# Per-item metrics: each has one value per held-out pair, so they get bootstrap intervals.
PAIR_METRICS = ("preference_accuracy", "preference_accuracy_normalized", "kl_to_reference")
REWARD_METRICS = ("reward_accuracy", "reward_margin")
SCALAR_METRICS = ("preference_accuracy", "preference_accuracy_normalized", "reward_accuracy", "reward_margin",
                  "kl_to_reference", "perplexity", "perplexity_heldout_chosen")


def run(cfg: DictConfig, run_dir: Path) -> records.EvalRecord:
    """Evaluate the run's models; returns the stage's record."""
    import time

    import torch

    from pipeline import generation
    from pipeline.generation import greedy_answers

    run_dir = Path(run_dir)
    merge = records.load(run_dir, records.MergeRecord)
    anneal = records.load(run_dir, records.AnnealRecord)
    merged_dir, annealed_dir = Path(merge.outputs.model), Path(anneal.outputs.model)
    reference_dir = Path(anneal.inputs.reference_path)
    store_path = Path(anneal.outputs.reference_logps)
    trainer = anneal.trainer
    max_length, truncation_mode = trainer.max_length, _truncation_mode(trainer.truncation_mode)
    model_dirs = {f"parent:{Path(p).name}": Path(p) for p in merge.inputs.parents}
    model_dirs.update({"merged": merged_dir, "annealed": annealed_dir})

    heldout = preferences.read_store(store_path)["heldout"]
    tokenizer = load_tokenizer(merged_dir)
    chosen = [tokenize_completion(tokenizer, r["prompt"], r["chosen"], max_length, truncation_mode) for r in heldout]
    rejected = [tokenize_completion(tokenizer, r["prompt"], r["rejected"], max_length, truncation_mode)
                for r in heldout]
    corpus_path = text_corpus(cfg.eval.text_corpus, anneal.config.data.heldout_text)
    texts = ([tokenize_text(tokenizer, t, max_length) for t in read_texts(corpus_path)] if corpus_path else None)
    prompts = list(dict.fromkeys(_prompt_text(tokenizer, r["prompt"]) for r in heldout))
    answers = exact_answers(prompts, anneal.config.data.answer_key)
    shown = spread(prompts, cfg.eval.samples)
    probed = spread(prompts, cfg.eval.generation.prompts or len(prompts))  # for generation health

    started = time.perf_counter()
    with torch.no_grad():
        reference = load_model(reference_dir)
        per_item, samples = {}, {}
        for name, model_dir in model_dirs.items():
            models.check_same_vocabulary(tokenizer, merged_dir, model_dir, f"Model {name}",
                                         "evaluate models that share one tokenizer.")
            model = reference if Path(model_dir).resolve() == reference_dir.resolve() else load_model(model_dir)
            per_item[name] = score_model(model, reference, chosen, rejected, texts, tokenizer.pad_token_id or 0,
                                         cfg.eval.batch_size)
            asked = sorted({p for by_prompt in answers.values() for p in by_prompt} | set(shown))
            generated = dict(zip(asked, greedy_answers(model, tokenizer, asked, cfg.eval.max_new_tokens)))
            per_item[name]["skill_correct"] = {skill: [float(generated[p] == answer) for p, answer in by_prompt.items()]
                                               for skill, by_prompt in answers.items()}
            samples[name] = [generated[p] for p in shown]
            per_item[name]["generation"] = generation.health(generation.generate(
                model, tokenizer, probed, cfg.eval.max_new_tokens, sample=cfg.eval.generation))
            if model is not reference:
                del model
            models.release_memory()
        del reference
        models.release_memory()
    scoring_seconds = time.perf_counter() - started

    ref_chosen = torch.tensor(heldout["ref_chosen_logps"])
    ref_rejected = torch.tensor(heldout["ref_rejected_logps"])
    results = {name: summarize(items, name in ("merged", "annealed"), ref_chosen, ref_rejected, trainer.beta,
                               cfg.eval)
               for name, items in per_item.items()}
    own = own_skills(cfg.eval.parent_skills, [Path(p).name for p in merge.inputs.parents], list(answers))
    for name, result in results.items():  # each parent's own skill kept, where the data says which it is
        if own and not name.startswith("parent:"):
            value, ci = M.retention(per_item[name]["skill_correct"],
                                    {p: per_item[f"parent:{p}"]["skill_correct"] for p in own}, own,
                                    cfg.eval.bootstrap_resamples, cfg.eval.seed)
            result["summary"]["retention"], result["summary"]["ci95"]["retention"] = value, ci
    comparison = {"annealed_vs_merged": compare(results["annealed"]["items"], results["merged"]["items"], cfg.eval)}
    health = generation_report({name: items["generation"] for name, items in per_item.items()}, cfg.eval,
                               len(probed))
    report = {
        "models": {name: r["summary"] for name, r in results.items()},
        "comparison": comparison,
        "heldout_pairs": len(heldout),
        # the DPO reference (rewards use its stored log-probs) and the model KL is measured against
        "reference": {"anneal": anneal.inputs.reference_label, "kl_to": reference_kl_name(anneal, reference_dir),
                      **({"parents": list(anneal.inputs.references)} if anneal.inputs.references else {})},
        "perplexity_on": str(corpus_path) if corpus_path else "heldout chosen completions",
        "beta": trainer.beta,
        "bootstrap": {"resamples": cfg.eval.bootstrap_resamples, "seed": cfg.eval.seed, "confidence": 0.95},
        "generation": health,
        "scoring_seconds": round(scoring_seconds, 3),
    }
    if cfg.eval.lm_eval:
        from pipeline.harness import run_lm_eval

        report["lm_eval"] = run_lm_eval(OmegaConf.to_container(cfg.eval.lm_eval, resolve=True), model_dirs)
    stage_dir = run_dir / "eval"
    training_log = Path(anneal.outputs.metrics)
    items = item_values(results, heldout, texts)
    publish(stage_dir, lambda tmp: write_outputs(tmp, report, training_log, shown, samples, items))
    log.info(comparison_table(report))
    return records.EvalRecord(
        inputs={"models": {name: str(d) for name, d in model_dirs.items()}, "reference": str(reference_dir),
                "reference_logps": str(store_path), "text_corpus": str(corpus_path) if corpus_path else None,
                "training_log": str(training_log)},
        outputs={"metrics": str(stage_dir / "metrics.json"), "report": str(stage_dir / "report.md"),
                 "plots": [str(stage_dir / name) for name in PLOTS], "items": str(stage_dir / "items.json")},
        config={"eval": OmegaConf.to_container(cfg.eval, resolve=True)},
        summary={"annealed_minus_merged_preference_accuracy": comparison["annealed_vs_merged"]["preference_accuracy"]},
    )


# ------------------------------------------------------------------------------------------------ inputs

def spread(items: list, n: int) -> list:
    """At most `n` of `items`, evenly spread over them."""
    return items[:: max(1, len(items) // n)][:n]


def own_skills(setting, parents: list[str], skills: list[str]) -> dict:
    """Which skill is each parent's own (parent name -> skill), for retention: `eval.parent_skills` as given, or
    (`auto`) every parent whose folder name is a skill of the data's answer key (the demo's add and reverse)."""
    if setting in (None, "auto"):
        return {p: p for p in parents if p in skills}
    own = dict(setting)
    wrong = {p: s for p, s in own.items() if p not in parents or s not in skills}
    if wrong:
        raise UserError(f"eval.parent_skills names {wrong}, but the parents are {parents} and the data's skills "
                        f"{skills}. Fix: map each parent's folder name to its skill, e.g. "
                        f"eval.parent_skills='{{{parents[0]}: {skills[0] if skills else 'skill'}}}', or auto.")
    return own


def reference_kl_name(anneal: records.AnnealRecord, reference_dir: Path) -> str:
    """The model KL to the reference is measured against: the reference, or with `anneal.reference=parents` (whose
    combined log-probs are no single model's) the first parent."""
    if anneal.inputs.references:
        return f"parent:{reference_dir.name} (the first of the parents the reference combines)"
    return anneal.inputs.reference_label if anneal.inputs.reference_label == "merged" else str(reference_dir.name)


def _truncation_mode(mode: str | None) -> str:
    """The anneal's truncation mode: its own setting, else DPOConfig's default."""
    from trl import DPOConfig

    return mode or DPOConfig.__dataclass_fields__["truncation_mode"].default


def text_corpus(choice, heldout_text: str | None) -> Path | None:
    """`auto`: the held-out text corpus that came with the data (`data.heldout_text`), else none (chosen
    completions)."""
    if choice is None:
        return None
    if choice == "auto":
        return Path(heldout_text) if heldout_text else None
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UserError(f"eval.text_corpus={choice} is not a file. Fix: pass a .jsonl file with a `text` field, "
                        "auto, or null (perplexity on the held-out chosen completions).")
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
        raise UserError(f"data.answer_key={answer_key} cannot be imported ({err}). Fix: name a function as "
                        "module.function (e.g. pipeline.demo.tasks.answer_key), or set data.answer_key=null.") from None
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


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------- tokenising

def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, list):  # conversational
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def tokenize_completion(tokenizer, prompt, completion, max_length, truncation_mode: str):
    """(input_ids, completion mask) as TRL's DPOTrainer builds them: prompt + completion (+ EOS for plain
    text), the completion starting where the tokenised prompt and prompt+completion diverge, truncated."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    else:
        eos = tokenizer.eos_token
        completion = completion if completion.endswith(eos) else completion + eos
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full_ids = tokenizer(text=prompt + completion)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids),
                                                                                          len(full_ids)))
    mask = [0] * start + [1] * (len(full_ids) - start)
    if max_length is not None:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        full_ids, mask = full_ids[cut], mask[cut]
    return full_ids, mask


def tokenize_text(tokenizer, text: str, max_length):
    """A corpus text: every token after the first counts (the first has no context to be predicted from)."""
    ids = tokenizer(text=text)["input_ids"][:max_length]
    return ids, [0] + [1] * (len(ids) - 1)


# ------------------------------------------------------------------------------------------------- scoring

def batches(sequences, batch_size: int, pad_id: int):
    """Right-padded (input_ids, attention_mask, loss mask) tensors, `batch_size` sequences at a time."""
    import torch

    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        loss_mask = torch.zeros((len(chunk), width), dtype=torch.float32)
        for row, (seq, mask) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
            loss_mask[row, :len(seq)] = torch.tensor(mask, dtype=torch.float32)
        yield ids, attention, loss_mask


def score(model, sequences, batch_size: int, pad_id: int, reference=None) -> dict:
    """Per sequence: summed and mean log-prob of the masked tokens, their count, and (with a reference)
    the mean per-token KL(model || reference) over them. One forward per batch."""
    import torch

    out = {"logps": [], "mean_logps": [], "tokens": [], "kl": []}
    for batch in batches(sequences, batch_size, pad_id):
        ids, attention, loss_mask = (t.to(model.device) for t in batch)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        labels, mask = ids[:, 1:], loss_mask[:, 1:]
        per_token = M.token_logps(logits, labels)
        out["logps"].append(M.sequence_logps(per_token, mask))
        out["mean_logps"].append(M.mean_logps(per_token, mask))
        out["tokens"].append(mask.sum(-1))
        if reference is not None:
            reference_logits = reference(input_ids=ids, attention_mask=attention).logits[:, :-1]
            out["kl"].append(M.masked_mean(M.per_token_kl(logits, reference_logits), mask))
    return {key: torch.cat(parts) for key, parts in out.items() if parts}


def score_model(model, reference, chosen, rejected, texts, pad_id: int, batch_size: int) -> dict:
    """Everything per item for one model: pair log-probs, KL on chosen completions, corpus token NLLs."""
    import torch

    scored_chosen = score(model, chosen, batch_size, pad_id, reference=None if model is reference else reference)
    scored_rejected = score(model, rejected, batch_size, pad_id)
    items = {"chosen_logps": scored_chosen["logps"], "rejected_logps": scored_rejected["logps"],
             "chosen_mean_logps": scored_chosen["mean_logps"], "chosen_tokens": scored_chosen["tokens"],
             "rejected_mean_logps": scored_rejected["mean_logps"],
             "kl": scored_chosen["kl"] if "kl" in scored_chosen else torch.zeros_like(scored_chosen["logps"])}
    if texts is None:  # perplexity on the held-out chosen completions
        items["nll"], items["nll_tokens"] = -scored_chosen["logps"], scored_chosen["tokens"]
    else:
        scored_texts = score(model, texts, batch_size, pad_id)
        items["nll"], items["nll_tokens"] = -scored_texts["logps"], scored_texts["tokens"]
    return items


# ------------------------------------------------------------------------------------------------ summaries

def summarize(items: dict, with_rewards: bool, ref_chosen, ref_rejected, beta: float, eval_cfg: DictConfig) -> dict:
    """A model's metrics and their bootstrap intervals; keeps the per-item values for comparisons."""
    per_item = {
        "preference_accuracy": M.preference_correct(items["chosen_logps"], items["rejected_logps"]),
        "preference_accuracy_normalized": M.preference_correct(items["chosen_mean_logps"],
                                                               items["rejected_mean_logps"]),
        "kl_to_reference": items["kl"],
    }
    summary = {name: float(values.mean()) for name, values in per_item.items()}
    ci = {name: M.bootstrap_ci(values.numpy(), eval_cfg.bootstrap_resamples, eval_cfg.seed)
          for name, values in per_item.items()}
    tokens = items["nll_tokens"].clamp(min=1)
    summary["perplexity"] = M.perplexity(float(items["nll"].sum()), int(items["nll_tokens"].sum()))
    lo, hi = M.bootstrap_ci((items["nll"] / tokens).numpy(), eval_cfg.bootstrap_resamples, eval_cfg.seed,
                            weights=items["nll_tokens"].numpy())
    ci["perplexity"] = [math.exp(lo), math.exp(hi)]
    # Always also on the held-out chosen completions (the answer part), whatever the corpus.
    summary["perplexity_heldout_chosen"] = M.perplexity(-float(items["chosen_logps"].sum()),
                                                        int(items["chosen_tokens"].sum()))
    lo, hi = M.bootstrap_ci((-items["chosen_logps"] / items["chosen_tokens"].clamp(min=1)).numpy(),
                            eval_cfg.bootstrap_resamples, eval_cfg.seed, weights=items["chosen_tokens"].numpy())
    ci["perplexity_heldout_chosen"] = [math.exp(lo), math.exp(hi)]
    if with_rewards:
        margins = M.reward_margins(items["chosen_logps"], items["rejected_logps"], ref_chosen, ref_rejected, beta)
        per_item["reward_accuracy"] = (margins > 0).float()
        per_item["reward_margin"] = margins
        summary["reward_accuracy"] = per_item["reward_accuracy"].mean().item()
        summary["reward_margin"] = margins.mean().item()
        ci["reward_accuracy"] = M.bootstrap_ci(per_item["reward_accuracy"].numpy(), eval_cfg.bootstrap_resamples,
                                               eval_cfg.seed)
        ci["reward_margin"] = M.bootstrap_ci(margins.numpy(), eval_cfg.bootstrap_resamples, eval_cfg.seed)
    summary["skill_accuracy"] = {s: sum(v) / len(v) for s, v in items["skill_correct"].items()}
    ci["skill_accuracy"] = {s: M.bootstrap_ci(v, eval_cfg.bootstrap_resamples, eval_cfg.seed)
                            for s, v in items["skill_correct"].items()}
    summary["ci95"] = ci
    return {"summary": summary, "items": {**per_item, "skill_accuracy": items["skill_correct"], "nll": items["nll"],
                                          "nll_tokens": items["nll_tokens"]}}


def generation_report(items: dict, eval_cfg: DictConfig, n_prompts: int) -> dict:
    """Generation health per model (each measure's mean over the probed prompts with a bootstrap interval) and
    annealed minus merged (paired); fewer generations ending with EOS, or more repetition (lower distinct-2), with
    the interval below 0 is flagged a regression."""
    boot = lambda v: M.bootstrap_ci(v, eval_cfg.bootstrap_resamples, eval_cfg.seed)
    models = {name: {**{k: float(sum(v) / len(v)) for k, v in h.items()}, "ci95": {k: boot(v) for k, v in h.items()}}
              for name, h in items.items()}
    versus = {}
    for key in items["annealed"]:
        delta = M.paired_bootstrap(items["annealed"][key], items["merged"][key], eval_cfg.bootstrap_resamples,
                                   eval_cfg.seed)
        versus[key] = {**delta, "regression": key != "length" and delta["ci95"][1] < 0}
    return {"prompts": n_prompts, "max_new_tokens": eval_cfg.max_new_tokens,
            "sampling": OmegaConf.to_container(eval_cfg.generation, resolve=True), "models": models,
            "annealed_vs_merged": versus}


def compare(a: dict, b: dict, eval_cfg: DictConfig) -> dict:
    """a minus b over the same held-out items: paired bootstrap per per-item metric (skills per skill)."""
    boot = lambda x, y: M.paired_bootstrap(x, y, eval_cfg.bootstrap_resamples, eval_cfg.seed)
    out = {name: boot(a[name].numpy(), b[name].numpy()) for name in (*PAIR_METRICS, *REWARD_METRICS)}
    out["perplexity"] = M.paired_bootstrap_perplexity(a["nll"].numpy(), b["nll"].numpy(), a["nll_tokens"].numpy(),
                                                      eval_cfg.bootstrap_resamples, eval_cfg.seed)
    out["skill_accuracy"] = {s: boot(a["skill_accuracy"][s], b["skill_accuracy"][s]) for s in a["skill_accuracy"]}
    return out


def item_values(results: dict, heldout, texts) -> dict:
    """Every model's per-item values (one per held-out pair, per skill prompt, per corpus text), so runs that
    share `key` (the same held-out pairs and texts) can be compared pair by pair (pipeline/sweep.py)."""
    key = hashlib.sha256(json.dumps([preferences.rows_fingerprint(heldout.select_columns(["prompt", "chosen",
                                                                                          "rejected"])),
                                     texts]).encode()).hexdigest()[:32]
    as_list = lambda v: {s: list(x) for s, x in v.items()} if isinstance(v, dict) else v.tolist()
    return {"key": key, "models": {name: {metric: as_list(values) for metric, values in r["items"].items()}
                                   for name, r in results.items()}}


# ------------------------------------------------------------------------------------------------- outputs

PLOTS = ("metrics.png", "training.png")


def write_outputs(stage_dir: Path, report: dict, training_log: Path, shown: list[str], samples: dict,
                  items: dict) -> None:
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (stage_dir / "items.json").write_text(json.dumps(items) + "\n")
    plot_metrics(report["models"], stage_dir / PLOTS[0])
    plot_training(training_log, stage_dir / PLOTS[1])
    (stage_dir / "report.md").write_text(report_markdown(report, shown, samples))


def _metric_panels(models: dict) -> list[tuple[str, dict]]:
    """(title, {model: (value, [lo, hi])}) for every scalar metric and every skill."""
    panels = []
    for metric in SCALAR_METRICS:
        panel = {name: (m[metric], m["ci95"][metric]) for name, m in models.items() if metric in m}
        panels.append((metric, panel))
    for skill in next(iter(models.values()))["skill_accuracy"]:
        panels.append((f"skill_accuracy/{skill}",
                       {name: (m["skill_accuracy"][skill], m["ci95"]["skill_accuracy"][skill])
                        for name, m in models.items()}))
    return panels


def plot_metrics(models: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _metric_panels(models)
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, panel) in zip(axes.flat, panels):
        names = list(panel)
        values = [panel[n][0] for n in names]
        errors = [[v - panel[n][1][0] for n, v in zip(names, values)],
                  [panel[n][1][1] - v for n, v in zip(names, values)]]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if title.startswith("perplexity"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("held-out metrics (bars: 95% bootstrap interval of each model's mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training(training_log: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in training_log.read_text().splitlines() if line.strip()]
    keys = ("loss", "rewards/accuracies", "rewards/margins")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_title(f"anneal {key}", fontsize=10)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"


def report_markdown(report: dict, shown: list[str], samples: dict) -> str:
    models = report["models"]
    lines = ["# Evaluation", "",
             f"{report['heldout_pairs']} held-out preference pairs; perplexity on {report['perplexity_on']}; "
             f"DPO beta {report['beta']}; 95% percentile bootstrap intervals, {report['bootstrap']['resamples']} "
             f"resamples, seed {report['bootstrap']['seed']}. DPO reference: {report['reference']['anneal']}"
             f"{' of ' + ', '.join(report['reference']['parents']) if 'parents' in report['reference'] else ''}; "
             f"kl_to_reference is measured against {report['reference']['kl_to']}.", "",
             "## Metrics", "", "| model | " + " | ".join(SCALAR_METRICS) + " | skill accuracy |",
             "|---" * (len(SCALAR_METRICS) + 2) + "|"]
    for name, m in models.items():
        cells = [f"{_fmt(m[k])} [{_fmt(m['ci95'][k][0])}, {_fmt(m['ci95'][k][1])}]" if k in m else "" for k in
                 SCALAR_METRICS]
        skills = ", ".join(f"{s} {v:.3f}" for s, v in m["skill_accuracy"].items())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {skills} |")
    retained = {name: m for name, m in models.items() if m.get("retention")}
    if retained:
        parents = [p for p in next(iter(retained.values()))["retention"] if p != "worst"]
        lines += ["", "## Retention of each parent's own skill (model / parent on that skill's items)", "",
                  "| model | " + " | ".join(parents) + " | worst |", "|---" * (len(parents) + 2) + "|"]
        cell = lambda m, p: ("n/a (the parent scores 0)" if m["retention"].get(p) is None else
                             f"{m['retention'][p]:.3f} [{m['ci95']['retention'][p][0]:.3f}, "
                             f"{m['ci95']['retention'][p][1]:.3f}]")
        for name, m in retained.items():
            lines.append(f"| {name} | " + " | ".join(cell(m, p) for p in [*parents, "worst"]) + " |")
    health = report["generation"]
    measures = [k for k in health["annealed_vs_merged"]]
    lines += ["", f"## Generation health ({health['prompts']} held-out prompts, sampled with seed "
              f"{health['sampling']['seed']}, temperature {health['sampling']['temperature']}, up to "
              f"{health['max_new_tokens']} new tokens)", "", "| model | " + " | ".join(measures) + " |",
              "|---" * (len(measures) + 1) + "|"]
    for name, m in health["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f} [{m['ci95'][k][0]:.3f}, {m['ci95'][k][1]:.3f}]"
                                                   for k in measures) + " |")
    for key, v in health["annealed_vs_merged"].items():
        flag = " **regression**" if v["regression"] else ""
        lines.append(f"| annealed - merged: {key} | {v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                     f"{flag} |" + " |" * (len(measures) - 1))
    lines += ["", "## Annealed minus merged (paired bootstrap)", "", "| metric | delta | 95% interval |",
              "|---|---|---|"]
    for metric, value in report["comparison"]["annealed_vs_merged"].items():
        entries = value.items() if metric == "skill_accuracy" else [(None, value)]
        for skill, v in entries:
            label = f"{metric}/{skill}" if skill else metric
            lines.append(f"| {label} | {v['delta']:+.4f} | [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] |")
            if "ratio" in v:
                lo, hi = v["ratio_ci95"]
                lines.append(f"| {label} ratio | {v['ratio']:.4f} | [{lo:.4f}, {hi:.4f}] |")
    if "lm_eval" in report:
        lines += ["", "## lm-evaluation-harness", "", "| model | task | metric | value |", "|---|---|---|---|"]
        lines += [f"| {name} | {task} | {metric} | {_fmt(value)} |" for name, tasks in report["lm_eval"].items()
                  for task, metrics in tasks.items() for metric, value in metrics.items()]
    lines += ["", "## Plots", "", f"![metrics]({PLOTS[0]})", "", f"![anneal training]({PLOTS[1]})", "",
              "## Sample generations (greedy)", "", "| prompt | " + " | ".join(samples) + " |",
              "|---" * (len(samples) + 1) + "|"]
    for i, prompt in enumerate(shown):
        lines.append(f"| {_cell(prompt)} | " + " | ".join(_cell(samples[n][i]) for n in samples) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(report: dict) -> str:
    """The comparison table as text (rich), for the console and the run's log."""
    import io
    import shutil

    from rich.console import Console
    from rich.table import Table

    models = report["models"]
    skills = list(next(iter(models.values()))["skill_accuracy"])
    header = ["model", "pref", "norm", "reward", "KL", "ppl", "ppl ans", *skills]
    columns = ("preference_accuracy", "preference_accuracy_normalized", "reward_accuracy", "kl_to_reference",
               "perplexity", "perplexity_heldout_chosen")
    cell = lambda m, k: "-" if k not in m else f"{m[k]:.1f}" if k.startswith("perplexity") else f"{m[k]:.3g}"
    delta = report["comparison"]["annealed_vs_merged"]["preference_accuracy"]
    ppl = report["comparison"]["annealed_vs_merged"]["perplexity"]
    caption = (f"annealed - merged preference accuracy: {delta['delta']:+.3f} "
               f"[{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]; annealed / merged perplexity: "
               f"{ppl['ratio']:.3f} [{ppl['ratio_ci95'][0]:.3f}, {ppl['ratio_ci95'][1]:.3f}] (95% paired bootstrap)")
    table = Table(title=f"eval: {report['heldout_pairs']} held-out pairs (pref: preference accuracy, norm: "
                        "per-token normalised; reward: DPO implicit reward accuracy; ppl ans: perplexity of the "
                        "chosen answers; skills: greedy exact match)",
                  caption=caption)
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for name, m in models.items():
        table.add_row(name, *(cell(m, k) for k in columns), *(f"{m['skill_accuracy'][s]:.3f}" for s in skills))
    text = io.StringIO()
    # at least 110 columns: a piped console reports 80
    Console(file=text, width=max(shutil.get_terminal_size().columns, 110), color_system=None).print(table)
    return text.getvalue().rstrip()
