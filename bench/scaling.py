"""Scaling curves: what an anneal costs as the model and the data grow, for the stage and for plain TRL.

    python bench/scaling.py --out docs/scaling      # 1M, 10M, 100M parameters x 32, 128 pairs; ~20 min, 2 cores
    python bench/scaling.py --sizes 1m,10m --pairs 64,256,1024 --out scaling/

For every model size and number of training pairs, the anneal stage (one run, its reference pass included) and
plain TRL (the parent resident as ref_model), each in a fresh process, alternating (bench/anneal_vs_trl.py's
workers: the same data, batch 8, max_length, dtype rule and deliverable). Writes `scaling.json`, `scaling.md` (the
table) and `scaling.png`: anneal seconds per 1k pairs and peak RSS against parameters, one line per variant and
data size. Seconds per 1k pairs = the whole anneal's wall time / pairs x 1000 (fixed costs, such as loading and
saving, spread over the pairs: they shrink as the data grows).
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anneal_vs_trl import prepare, run_worker  # noqa: E402

BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1m,10m,100m")
    parser.add_argument("--pairs", default="32,128")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("scaling"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="scaling-bench-"))
    rows = []
    try:
        for size in args.sizes.split(","):
            for pairs in map(int, args.pairs.split(",")):
                case = prepare(size, work / f"{size}-{pairs}", steps=pairs // BATCH, batch=BATCH, sweep=False)
                params = case_parameters(case)
                runs = {"anneal": [], "trl": []}
                for r in range(args.repeats):
                    for variant in ("anneal", "trl") if r % 2 == 0 else ("trl", "anneal"):
                        runs[variant].append(run_worker(variant, case))
                for variant, rs in runs.items():
                    wall = statistics.median(x["wall_s"] for x in rs)
                    rows.append(
                        {
                            "size": size,
                            "params_m": round(params / 1e6, 1),
                            "pairs": pairs,
                            "variant": variant,
                            "wall_s": round(wall, 1),
                            "s_per_1k_pairs": round(wall / pairs * 1000, 1),
                            "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in rs)),
                            "bf16": rs[0]["bf16"],
                        }
                    )
                    print(
                        f"  {size} {pairs:5d} pairs {variant:7s} {wall:7.1f} s  "
                        f"{rows[-1]['s_per_1k_pairs']:8.1f} s/1k pairs  {rows[-1]['peak_rss_mb']:6d} MB",
                        flush=True,
                    )
                shutil.rmtree(case, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "scaling.md").write_text(table(rows))
    plot(rows, args.out / "scaling.png")
    print("\n" + table(rows) + f"\nwrote {args.out}/scaling.json, scaling.md, scaling.png")


def case_parameters(case: Path) -> int:
    from pipeline import models, records

    return models.count_parameters(records.load(case / "merged-run", records.MergeRecord).outputs.model)


def table(rows: list[dict]) -> str:
    lines = [
        "| parameters | pairs | stage: s per 1k pairs | plain TRL: s per 1k pairs | time ratio | "
        "stage peak RSS MB | plain TRL peak RSS MB | RSS ratio | bf16 autocast |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["params_m"], r["pairs"], r["variant"]): r for r in rows}
    for params, pairs in sorted({(r["params_m"], r["pairs"]) for r in rows}):
        a, t = by[(params, pairs, "anneal")], by[(params, pairs, "trl")]
        lines.append(
            f"| {params}M | {pairs} | {a['s_per_1k_pairs']} | {t['s_per_1k_pairs']} | "
            f"{a['wall_s'] / t['wall_s']:.2f} | {a['peak_rss_mb']} | {t['peak_rss_mb']} | "
            f"{a['peak_rss_mb'] / t['peak_rss_mb']:.2f} | {a['bf16']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, style in (("anneal", "-"), ("trl", "--")):
        for pairs in sorted({r["pairs"] for r in rows}):
            points = sorted(
                (r["params_m"], r["s_per_1k_pairs"], r["peak_rss_mb"])
                for r in rows
                if r["variant"] == variant and r["pairs"] == pairs
            )
            label = f"{'stage' if variant == 'anneal' else 'plain TRL'}, {pairs} pairs"
            left.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
            right.plot([p[0] for p in points], [p[2] for p in points], style, marker="o", label=label)
    for axis, ylabel in ((left, "anneal seconds per 1k pairs"), (right, "peak RSS (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters (millions)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle("merge-anneal's anneal stage vs plain TRL DPO (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
