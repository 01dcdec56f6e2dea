"""A sweep summary shown: summary.md (the ranked jobs, merged against annealed, the jobs compared), summary.png,
and the curves of metrics against a numeric setting (curves.png). Plain functions over the summary that
pipeline/sweep.py builds."""

from pathlib import Path

SUMMARY_MD, SUMMARY_PNG = "summary.md", "summary.png"
CURVES_PNG = "curves.png"  # with pipeline.curve (e.g. +sweep=data_size)
# Per-item metrics compared between jobs' annealed models, besides perplexity and each benchmark.
# (KL and reward metrics are left out: they depend on each job's own reference.)
COMPARED = ("preference_accuracy", "preference_accuracy_normalized")


def _walk(node, path: str):
    """What a dotted path names in the summary's nested dicts; None where nothing is."""
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------- markdown


def shown_metric(objective_metric: str) -> str:
    """The metric shown merged against annealed: the objective's own when it is a model metric."""
    head, _, rest = objective_metric.partition(".")
    return rest if head in ("merged", "annealed") and rest else "preference_accuracy"


def model_value(run: dict, model: str, metric: str):
    """(value, [lo, hi]) of a model's metric (`benchmarks.<task>` and `retention.worst` reach into their groups), or
    (None, None)."""
    models = run.get("metrics", {})
    if model not in models:
        return None, None
    value, ci = _walk(models[model], metric), _walk(models[model]["ci95"], metric)
    return (value, ci) if isinstance(value, (int, float)) else (None, None)


def _num(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _delta(comparison: dict | None) -> str:
    if not comparison:
        return "–"
    lo, hi = comparison["ci95"]
    return f"{comparison['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def summary_markdown(summary: dict) -> str:
    runs, objective = summary["runs"], summary["objective"]
    shown = shown_metric(objective["metric"])
    tasks = sorted({t for r in runs for t in r.get("metrics", {}).get("annealed", {}).get("benchmarks", {})})
    columns = list(dict.fromkeys([shown, "preference_accuracy", "perplexity", *(f"benchmarks.{t}" for t in tasks)]))
    jobs, cache = summary["jobs"], summary["cache"]
    reuse = lambda kind: (
        f"computed {cache[kind].get('miss', 0)}, reused {cache[kind].get('hit', 0)}"
        + (f", uncached {cache[kind]['off']}" if cache[kind].get("off") else "")
    )
    lines = [
        "# Sweep summary",
        "",
        f"{jobs['total']} jobs: {jobs['done']} done, {jobs['failed']} failed"
        + (f", {jobs['incomplete']} incomplete" if jobs["incomplete"] else "")
        + ("" if summary["complete"] else " (the sweep is still running or stopped early)")
        + f". Ranked by `{objective['metric']}` ({objective['direction']}). "
        f"Merges: {reuse('merge')}; reference log-probs: {reuse('reference_logps')}.",
        "",
        "| rank | job | overrides | objective | "
        + " | ".join(f"{c} merged → annealed" for c in columns)
        + f" | Δ {shown} annealed − merged [95%] | cache merge / ref. | status |",
        "|---" * (len(columns) + 7) + "|",
    ]
    for run in runs:
        cells = []
        for column in columns:
            merged, annealed = model_value(run, "merged", column)[0], model_value(run, "annealed", column)[0]
            cells.append(f"{_num(merged)} → {_num(annealed)}")
        comparison = _walk(run.get("annealed_vs_merged", {}), shown)
        lines.append(
            f"| {run['rank'] or '–'} | {run['job']} | {_code(run['label'])} | {_num(run['objective'])} | "
            + " | ".join(cells)
            + f" | {_delta(comparison)} | "
            f"{run['cache']['merge'] or '–'} / {run['cache']['reference_logps'] or '–'} | {run['status']} |"
        )
    lines += _comparison_lines(summary, shown)
    failed = [r for r in runs if r["status"] != "done" or r.get("objective_error")]
    if failed:
        lines += ["", "## Jobs without a result", ""]
        lines += [
            f"- job {r['job']} ({_code(r['label'])}, {r['run_dir']}): {r['status']}; "
            f"{r.get('error') or r.get('objective_error') or 'see its log'}"
            for r in failed
        ]
    if summary.get("conclusion"):
        lines += ["", f"**Conclusion.** {summary['conclusion']}"]
    lines += ["", f"![ranking]({SUMMARY_PNG})", ""]
    return "\n".join(lines)


def _comparison_lines(summary: dict, shown: str) -> list[str]:
    comparisons = summary["comparisons"]
    pairs = [p for p in comparisons["pairs"] if p["comparable"]]
    if not comparisons["pairs"]:
        return []
    what = "each job against the best" if comparisons["mode"] == "best" else "every pair of jobs"
    lines = [
        "",
        "## Jobs compared",
        "",
        f"Annealed models, {what}: A − B over the same held-out items, 95% paired bootstrap interval "
        f"({comparisons['bootstrap']['resamples']} resamples); **differs** when the interval excludes 0.",
        "",
    ]
    headline = shown if shown in COMPARED or shown.startswith("benchmarks.") else "preference_accuracy"
    if pairs:
        differ = [p for p in pairs if p["metrics"][headline]["differs"]]
        same = [p for p in pairs if not p["metrics"][headline]["differs"]]
        name = lambda p: f"{_code(p['a_label'])} vs {_code(p['b_label'])}"
        differing = "; ".join(f"{name(p)} ({_delta(p['metrics'][headline])})" for p in differ)
        lines.append(
            f"On {headline}: "
            + (f"**differ**: {differing}. " if differ else "no pair differs measurably. ")
            + (f"No measurable difference: {'; '.join(name(p) for p in same)}." if same and differ else "")
        )
        others = [
            f"{metric} {len(found)} of {len(pairs)}"
            for metric, found in comparisons["differ"].items()
            if metric != headline
        ]
        lines += ["", f"Pairs that differ on the other metrics: {'; '.join(others)}."]
    lines += ["", "| A | B | metric | A − B [95%] | |", "|---|---|---|---|---|"]
    for pair in comparisons["pairs"]:
        if not pair["comparable"]:
            lines.append(
                f"| {_code(pair['a_label'])} | {_code(pair['b_label'])} | – | not compared: {pair['reason']} | |"
            )
            continue
        for metric, value in pair["metrics"].items():
            lines.append(
                f"| {_code(pair['a_label'])} | {_code(pair['b_label'])} | {metric} | {_delta(value)} | "
                f"{'**differs**' if value['differs'] else ''} |"
            )
    return lines


# ------------------------------------------------------------------------------------------------------ plot


def plot_summary(summary: dict, path: Path) -> None:
    """Left: the shown metric, merged and annealed, per job in rank order (95% intervals); right: its paired
    annealed − merged delta per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = shown_metric(summary["objective"]["metric"])
    runs = [r for r in summary["runs"] if r["status"] == "done" and "metrics" in r][:40]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * max(len(runs), 2)))
    labels = [f"#{r['rank'] or '–'} job {r['job']}: {r['label']}"[:60] for r in runs]
    rows = range(len(runs))
    for offset, model, color in ((-0.2, "merged", "tab:gray"), (0.2, "annealed", "tab:blue")):
        values, errors = [], [[], []]
        for run in runs:
            value, ci = model_value(run, model, shown)
            values.append(value if value is not None else float("nan"))
            errors[0].append(value - ci[0] if ci else 0)
            errors[1].append(ci[1] - value if ci else 0)
        left.barh([y + offset for y in rows], values, height=0.4, xerr=errors, capsize=3, color=color, label=model)
    deltas = [_walk(r.get("annealed_vs_merged", {}), shown) for r in runs]
    right.barh(
        list(rows),
        [d["delta"] if d else float("nan") for d in deltas],
        height=0.5,
        color="tab:green",
        xerr=[
            [d["delta"] - d["ci95"][0] if d else 0 for d in deltas],
            [d["ci95"][1] - d["delta"] if d else 0 for d in deltas],
        ],
        capsize=3,
    )
    right.axvline(0, color="black", linewidth=0.8)
    for ax in (left, right):
        ax.set_yticks(list(rows), labels if ax is left else [""] * len(runs), fontsize=8)
        ax.invert_yaxis()
    left.set_title(f"{shown}: merged vs annealed (95% bootstrap)", fontsize=10)
    fig.legend(*left.get_legend_handles_labels(), loc="upper left", ncol=2, fontsize=8)
    right.set_title("annealed − merged (95% paired bootstrap)", fontsize=10)
    if not runs:
        left.text(0.5, 0.5, "no finished jobs yet", ha="center", va="center", transform=left.transAxes)
    fig.suptitle(f"sweep ranked by {summary['objective']['metric']} ({summary['objective']['direction']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def curves(runs: list[dict], x: str, metrics: list[str]) -> dict:
    """Per metric, per series (a job's overrides other than `x` and those every job shares), the points
    (x, value, [lo, hi]) of the finished jobs that set `x` (a numeric override such as data.train_pairs), in
    order of x."""
    out = {metric: {} for metric in metrics}
    shared = set.intersection(*(set(r.get("overrides", [])) for r in runs)) if runs else set()
    for run in runs:
        setting = next((o.split("=", 1)[1] for o in run.get("overrides", []) if o.startswith(f"{x}=")), None)
        if setting is None or run["status"] != "done":
            continue
        series = " ".join(o for o in run["overrides"] if not o.startswith(f"{x}=") and o not in shared) or "all"
        for metric in metrics:
            model, _, name = metric.partition(".")
            value, ci = model_value(run, model, name)
            out[metric].setdefault(series, []).append([float(setting), value, ci])
    for by_series in out.values():
        for points in by_series.values():
            points.sort(key=lambda p: p[0])
    return out


def plot_curves(table: dict, x: str, path: Path) -> None:
    """One panel per metric: each series against `x` (log scale), with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(table), 1), figsize=(6 * max(len(table), 1), 4.5), squeeze=False)
    for ax, (metric, by_series) in zip(axes[0], table.items()):
        for series, points in by_series.items():
            xs = [p[0] for p in points]
            ys = [p[1] if p[1] is not None else float("nan") for p in points]
            errors = [[p[1] - p[2][0] if p[2] else 0 for p in points], [p[2][1] - p[1] if p[2] else 0 for p in points]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=series[:50])
        ax.set_xscale("log")
        ticks = sorted({p[0] for points in by_series.values() for p in points})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(x)
        ax.set_title(metric, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
