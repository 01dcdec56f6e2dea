"""The demo's numbers over several anneal seeds: what the quick start's run shows, and how much of it moves.

    python bench/demo_spread.py --seeds 0 1 2 3 4             # five demo runs, then the table
    python bench/demo_spread.py --seeds 0 1 2 --out /tmp/s    # run folders there (a finished one is reused)
    python bench/demo_spread.py --collect /tmp/s              # only the table, from run folders already there

Each run is the quick start's `python -m pipeline +merge=slerp` with `anneal.trainer.seed=<seed>` (the demo's
recipe sets 0) and `hydra.run.dir=<out>/<seed>`, one after another, in their own processes. The parents and the
merge are cached and deterministic on one machine; the seed changes the order in which the anneal meets its pairs, so
the annealed model, its answers and the verdict are what vary. Eval's own seeds (bootstrap, sampled answers) are the
config's, the same in every run.

Printed: one markdown table, each figure from `<run>/eval/metrics.json`: the first seed's value and the min - max
over all seeds (a verdict: each distinct answer with its count), and each run's wall time.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("parent:add", "parent:reverse", "merged", "annealed")


def run_seed(seed: int, run_dir: Path) -> float | None:
    """One demo run with this anneal seed; its wall seconds, or None when a finished run was reused."""
    if (run_dir / "eval" / "metrics.json").exists():
        return None
    command = [sys.executable, "-m", "pipeline", "+merge=slerp", f"anneal.trainer.seed={seed}",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    print(f"seed {seed}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def figures(metrics: dict) -> dict[str, float | str]:
    """The figures the README's demo table quotes, by row name."""
    out: dict[str, float | str] = {}
    for model in MODELS:
        for task, value in sorted(metrics["models"][model]["benchmarks"].items()):
            out[f"{model} {task}"] = value
    for model in ("merged", "annealed"):
        out[f"{model} worst retention"] = metrics["models"][model]["retention"]["worst"]
        out[f"{model} held-out preference accuracy"] = metrics["models"][model]["preference_accuracy"]
    for opponent, row in metrics["win_rate"]["vs"].items():
        out[f"annealed vs {opponent}: win rate"] = row["win_rate"]
        out[f"annealed vs {opponent}: length-controlled"] = row["length_controlled"]
    out["verdict capabilities"] = metrics["verdict"]["capabilities"]
    out["verdict answers"] = metrics["verdict"]["answers"]
    return out


def table(rows_by_seed: dict[int, dict], seconds: dict[int, float | None]) -> str:
    seeds = sorted(rows_by_seed)
    first = seeds[0]
    lines = [f"| figure | seed {first} | min - max over seeds {', '.join(map(str, seeds))} |", "|---|---|---|"]
    for name, value in rows_by_seed[first].items():
        values = [rows_by_seed[s][name] for s in seeds]
        if isinstance(value, str):
            spread = ", ".join(f"{v} {n}/{len(values)}" for v, n in Counter(values).most_common())
            lines.append(f"| {name} | {value} | {spread} |")
        else:
            lines.append(f"| {name} | {value:.3f} | {min(values):.3f} - {max(values):.3f} |")
    timed = [f"{s}: {seconds[s]:.0f} s" for s in seeds if seconds.get(s) is not None]
    if timed:
        lines.append("")
        lines.append("wall time per run (the whole `python -m pipeline`): " + ", ".join(timed))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a new temp folder)")
    parser.add_argument("--collect", type=Path, default=None, help="only read <folder>/<seed>/ runs already there")
    parser.add_argument("--json", type=Path, default=None, help="also write every seed's figures here")
    args = parser.parse_args()

    out_dir = args.collect or args.out or Path(tempfile.mkdtemp(prefix="demo-spread-"))
    seconds: dict[int, float | None] = {}
    if args.collect is None:
        for seed in args.seeds:
            seconds[seed] = run_seed(seed, out_dir / str(seed))
    rows = {s: figures(json.loads((out_dir / str(s) / "eval" / "metrics.json").read_text())) for s in args.seeds}
    if args.json:
        args.json.write_text(json.dumps({"runs": str(out_dir), "seconds": seconds, "figures": rows}, indent=1))
    print(f"runs: {out_dir}")
    print(table(rows, seconds))


if __name__ == "__main__":
    main()
