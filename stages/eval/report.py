"""The eval stage's outputs: metrics.json, items.json, report.md, the plots, and the comparison table for the
console."""

import json
from pathlib import Path

from pipeline.records import SCALAR_METRICS, EvalReport

PLOTS = ("metrics.png", "training.png")


def write_outputs(
    stage_dir: Path, evaluation: EvalReport, training_log: Path, shown: list[str], samples: dict, items: dict
) -> None:
    stage_dir.mkdir(parents=True)
    evaluation.write(stage_dir / "metrics.json")
    (stage_dir / "items.json").write_text(json.dumps(items) + "\n")
    report = evaluation.model_dump(exclude_unset=True)  # the report as written, for the markdown and the plots
    plot_metrics(report["models"], stage_dir / PLOTS[0])
    plot_training(training_log, stage_dir / PLOTS[1])
    (stage_dir / "report.md").write_text(report_markdown(report, shown, samples))


def _metric_panels(models: dict) -> list[tuple[str, dict]]:
    """(title, {model: (value, [lo, hi])}) for every scalar metric and every benchmark."""
    panels = []
    for metric in SCALAR_METRICS:
        panel = {name: (m[metric], m["ci95"][metric]) for name, m in models.items() if metric in m}
        panels.append((metric, panel))
    for task in next(iter(models.values())).get("benchmarks", {}):
        panel = {name: (m["benchmarks"][task], m["ci95"]["benchmarks"][task]) for name, m in models.items()}
        panels.append((f"benchmarks/{task}", panel))
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
        errors = [  # at least 0: a one-item interval can miss its value by a rounding
            [max(v - panel[n][1][0], 0.0) for n, v in zip(names, values)],
            [max(panel[n][1][1] - v, 0.0) for n, v in zip(names, values)],
        ]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if title.startswith("perplexity"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
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
    """report.md: the verdict, how it was measured, then each section."""
    reference = report["reference"]
    parents = f" of {', '.join(reference['parents'])}" if "parents" in reference else ""
    lines = [
        "# Evaluation",
        "",
        f"**Verdict.** {report['verdict']['sentence']}",
        "",
        f"{report['heldout_pairs']} held-out preference pairs; perplexity on {report['perplexity_on']}; "
        f"DPO beta {report['beta']}; 95% percentile bootstrap intervals, {report['bootstrap']['resamples']} "
        f"resamples, seed {report['bootstrap']['seed']}. DPO reference: {reference['anneal']}{parents}; "
        f"kl_to_reference is measured against {reference['kl_to']}.",
        *extrapolation_line(report.get("extrapolation")),
        *metrics_section(report["models"]),
        *benchmarks_section(report.get("benchmarks"), report["models"]),
        *retention_section(report["models"]),
        *win_rate_section(report.get("win_rate")),
        *health_section(report["generation"]),
        *comparison_section(report["comparison"]["annealed_vs_merged"]),
        *contamination_section(report.get("contamination")),
        *["", "## Plots", "", f"![metrics]({PLOTS[0]})", "", f"![anneal training]({PLOTS[1]})"],
        *samples_section(shown, samples),
    ]
    return "\n".join(lines) + "\n"


def extrapolation_line(extrapolation: dict | None) -> list[str]:
    """anneal.extrapolate: which alpha became the annealed model, chosen on the validation pairs."""
    if not extrapolation:
        return []
    tried = ", ".join(f"{alpha} {accuracy:.3f}" for alpha, accuracy in extrapolation["alphas"].items())
    return [
        "",
        f"The annealed model is extrapolated, merged + {extrapolation['chosen']:g} x (annealed - merged): the alpha "
        f"with the best preference accuracy on {extrapolation['validation_pairs']} validation pairs carved from the "
        f"training pairs (alpha: accuracy {tried}; 1 is the model as trained).",
    ]


def interval(value: float, ci, fmt: str = ".3f") -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def metrics_section(models: dict) -> list[str]:
    lines = [
        "",
        "## Held-out pairs",
        "",
        "| model | " + " | ".join(SCALAR_METRICS) + " |",
        "|---" * (len(SCALAR_METRICS) + 1) + "|",
    ]
    for name, m in models.items():
        cells = [
            f"{_fmt(m[k])} [{_fmt(m['ci95'][k][0])}, {_fmt(m['ci95'][k][1])}]" if k in m else "" for k in SCALAR_METRICS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def benchmarks_section(bench: dict | None, models: dict) -> list[str]:
    if not bench:
        return ["", "## Benchmarks", "", "None ran (eval/benchmarks=none): capabilities are not measured."]
    tasks = list(bench["tasks"])
    described = ", ".join(
        f"{t} ({d['metric']}, {d['items']} items, chance {d['chance']:.2f})" for t, d in bench["tasks"].items()
    )
    lines = [
        "",
        "## Benchmarks (lm-evaluation-harness, the same items for every model)",
        "",
        described,
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | " + " | ".join(interval(m["benchmarks"][t], m["ci95"]["benchmarks"][t]) for t in tasks) + " |"
        )
    for parent, deltas in bench["merged_vs_parents"].items():
        lines.append(
            f"| merged - {parent} | "
            + " | ".join(interval(deltas[t]["delta"], deltas[t]["ci95"], "+.3f") for t in tasks)
            + " |"
        )
    own = "; ".join(f"{p}: {', '.join(ts)}" for p, ts in bench["parent_tasks"].items())
    return [*lines, "", f"Each parent's own tasks: {own}. Unpaired documents: {bench['unmatched']}."]


def retention_section(models: dict) -> list[str]:
    retained = {name: m for name, m in models.items() if m.get("retention")}
    if not retained:
        return []
    parents = [p for p in next(iter(retained.values()))["retention"] if p != "worst"]
    lines = [
        "",
        "## Each parent's skills kept ((model - chance) / (parent - chance) on the parent's own tasks)",
        "",
        "| model | " + " | ".join(parents) + " | worst |",
        "|---" * (len(parents) + 2) + "|",
    ]
    cell = lambda m, p: (
        "n/a (the parent scores 0)"
        if m["retention"].get(p) is None
        else interval(m["retention"][p], m["ci95"]["retention"][p])
    )
    for name, m in retained.items():
        lines.append(f"| {name} | " + " | ".join(cell(m, p) for p in [*parents, "worst"]) + " |")
    return lines


def health_section(health: dict) -> list[str]:
    measures = list(health["annealed_vs_merged"])
    sampling = health["sampling"]
    lines = [
        "",
        f"## Generation health ({health['prompts']} held-out prompts, sampled with seed {sampling['seed']}, "
        f"temperature {sampling['temperature']}, up to {health['max_new_tokens']} new tokens)",
        "",
        "| model | " + " | ".join(measures) + " |",
        "|---" * (len(measures) + 1) + "|",
    ]
    for name, m in health["models"].items():
        lines.append(f"| {name} | " + " | ".join(interval(m[k], m["ci95"][k]) for k in measures) + " |")
    for key, v in health["annealed_vs_merged"].items():
        flag = " **regression**" if v["regression"] else ""
        lines.append(
            f"| annealed - merged: {key} | {interval(v['delta'], v['ci95'], '+.3f')}{flag} |"
            + " |" * (len(measures) - 1)
        )
    return lines


def comparison_section(comparison: dict) -> list[str]:
    lines = [
        "",
        "## Annealed minus merged (paired bootstrap)",
        "",
        "| metric | delta | 95% interval |",
        "|---|---|---|",
    ]
    for metric, value in comparison.items():
        entries = value.items() if metric == "benchmarks" else [(None, value)]
        for task, v in entries:
            label = f"{metric}/{task}" if task else metric
            lines.append(f"| {label} | {v['delta']:+.4f} | [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] |")
            if "ratio" in v:
                lo, hi = v["ratio_ci95"]
                lines.append(f"| {label} ratio | {v['ratio']:.4f} | [{lo:.4f}, {hi:.4f}] |")
    return lines


def win_rate_section(judged: dict | None) -> list[str]:
    if not judged:
        return ["", "## Win rate", "", "Not measured: no reward (eval.win_rate.reward)."]
    lines = [
        "",
        f"## Win rate (the annealed model's answers against each model's, {judged['prompts']} held-out "
        f"prompts, reward {judged['reward']})",
        "",
        "| against | wins / ties / losses | win rate | length-controlled | length-matched (n) | reward delta | "
        "length delta |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in judged["vs"].items():
        matched = v["length_matched"]
        lines.append(
            f"| {name} | {v['wins']} / {v['ties']} / {v['losses']} | {interval(v['win_rate'], v['win_rate_ci95'])}"
            f" | {interval(v['length_controlled'], v['length_controlled_ci95'])} | "
            f"{_fmt(matched['win_rate']) if matched['win_rate'] is not None else '-'} ({matched['n']}) | "
            f"{interval(v['reward_delta'], v['reward_delta_ci95'], '+.3f')} | {v['length_delta']:+.1f} |"
        )
    accuracy = judged["reward_accuracy"]
    unfinished = ", ".join(f"{n} {k}" for n, k in judged["unfinished"].items())
    return [
        *lines,
        "",
        f"The reward's own accuracy on the {accuracy['pairs']} held-out pairs: "
        f"{interval(accuracy['value'], accuracy['ci95'])}. Answers without an EOS within the limit: {unfinished}; "
        f"cut by the reward model's length: {judged['truncated_by_reward_model']}."
        + (f" **Warning:** {judged['warning']}" if judged.get("warning") else ""),
    ]


def contamination_section(found: dict | None) -> list[str]:
    if not found:
        return []
    flag = "**flagged**" if found["flagged"] else "none found"
    return [
        "",
        "## Contamination audit",
        "",
        f"Eval items sharing their text with a training prompt: {found['exact']};"
        f" sharing a 13-gram with a training text: {found['ngram13']} ({flag}); training rows repeating a "
        f"prompt: {found['training_rows_repeating_a_prompt']}.",
    ]


def samples_section(shown: list[str], samples: dict) -> list[str]:
    lines = [
        "",
        "## Sample generations (greedy)",
        "",
        "| prompt | " + " | ".join(samples) + " |",
        "|---" * (len(samples) + 1) + "|",
    ]
    for i, prompt in enumerate(shown):
        lines.append(f"| {_cell(prompt)} | " + " | ".join(_cell(samples[n][i]) for n in samples) + " |")
    return lines


def comparison_table(evaluation: EvalReport) -> str:
    """The comparison table as text (rich), for the console and the run's log."""
    report = evaluation.model_dump(exclude_unset=True)
    import io
    import shutil

    from rich.console import Console
    from rich.table import Table

    models = report["models"]
    tasks = list(next(iter(models.values())).get("benchmarks", {}))
    header = ["model", "pref", "norm", "reward", "KL", "ppl", "ppl ans", *tasks]
    columns = (
        "preference_accuracy",
        "preference_accuracy_normalized",
        "reward_accuracy",
        "kl_to_reference",
        "perplexity",
        "perplexity_heldout_chosen",
    )
    cell = lambda m, k: "-" if k not in m else f"{m[k]:.1f}" if k.startswith("perplexity") else f"{m[k]:.3g}"
    delta = report["comparison"]["annealed_vs_merged"]["preference_accuracy"]
    ppl = report["comparison"]["annealed_vs_merged"]["perplexity"]
    caption = (
        f"annealed - merged preference accuracy: {delta['delta']:+.3f} "
        f"[{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]; annealed / merged perplexity: "
        f"{ppl['ratio']:.3f} [{ppl['ratio_ci95'][0]:.3f}, {ppl['ratio_ci95'][1]:.3f}] (95% paired bootstrap)"
    )
    table = Table(
        title=f"eval: {report['heldout_pairs']} held-out pairs (pref: preference accuracy, norm: "
        "per-token normalised; reward: DPO implicit reward accuracy; ppl ans: perplexity of the "
        "chosen answers; then each benchmark)",
        caption=caption,
    )
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for name, m in models.items():
        table.add_row(name, *(cell(m, k) for k in columns), *(f"{m['benchmarks'][t]:.3f}" for t in tasks))
    text = io.StringIO()
    # at least 110 columns: a piped console reports 80
    Console(file=text, width=max(shutil.get_terminal_size().columns, 110), color_system=None).print(table)
    return text.getvalue().rstrip()
