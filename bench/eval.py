"""Benchmark: the eval stage against the same work done the usual way, side by side in one run.

    python bench/eval.py                     # the demo: `python -m pipeline +merge=slerp` first, in a temp folder
    python bench/eval.py --run <run folder>  # any finished run (merge and anneal done), e.g. a real model's on a GPU

Each side runs in its own processes, started from the command line as a user starts them, on a copy of the run:

  eval   `python -m pipeline pipeline.stages=[eval]`: each model loaded once for everything (pair log-probs, KL to the
         reference, perplexity, sampled and greedy answers, the benchmarks through lm-eval's HFLM around the loaded
         model), the reward loaded after the policies;
  usual  per model `lm-eval run --model hf` on the same tasks and documents (`--samples`, `--log_samples`, the same
         batch size and dtype), then `bench/eval.py usual-score` (a script that loads each model to score the pairs
         and sample the answers: the eval stage's own scoring code, benchmarks off) and `bench/eval.py usual-reward`
         (the reward on those answers: the win rates).

Printed: the wall seconds of each part, eval / usual (the goal: <= 0.7), and whether the results are equal: every
benchmark document's value per model (lm-eval's sample logs against eval's items.json) and the win rates.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def run_config(run_dir: Path):
    """The run's composed config (its .hydra/config.yaml; the pipeline's resolvers registered)."""
    from omegaconf import OmegaConf

    import pipeline  # noqa: F401  (resolvers)

    return OmegaConf.load(run_dir / ".hydra" / "config.yaml")


def lm_eval_commands(run_dir: Path, out: Path) -> list[tuple[str, list[str]]]:
    """Per model, the lm-eval CLI call that does the eval stage's benchmark work: its tasks, documents, batch size."""
    import torch

    from pipeline import manifest

    cfg, stages = run_config(run_dir), manifest.load(run_dir)["stages"]
    bench = cfg.eval.benchmarks
    docs = json.loads(Path(stages["eval"]["outputs"]["items"]).read_text())["benchmark_docs"]
    samples = {task: [int(d.split(":")[0]) for d in ids] for task, ids in docs.items()}
    cuda = torch.cuda.is_available()
    commands = []
    for name, folder in stages["eval"]["inputs"]["models"].items():
        command = [
            *("lm-eval", "run", "--model", "hf"),
            *("--model_args", f"pretrained={folder},dtype={'bfloat16' if cuda else 'float32'}"),
            *("--tasks", *bench.tasks, "--samples", json.dumps(samples), "--log_samples"),
            *("--batch_size", str(bench.batch_size or cfg.eval.batch_size), "--device", "cuda" if cuda else "cpu"),
            *("--output_path", str(out / name.replace(":", "_"))),
        ]
        if bench.num_fewshot is not None:
            command += ["--num_fewshot", str(bench.num_fewshot)]
        if bench.include_path:
            command += ["--include_path", str(bench.include_path)]
        if bench.metadata:
            command += ["--metadata", json.dumps(dict(bench.metadata))]
        commands.append((name, command))
    return commands


def usual_score(run_dir: Path, out: Path) -> None:
    """The pairs scored and the answers sampled, each model loaded from disk once more (the eval stage's code)."""
    from stages import eval as stage
    from stages.eval.settings import EvalSettings

    cfg = run_config(run_dir)
    cfg.eval.benchmarks.tasks = []
    settings = EvalSettings.of(cfg.eval, "eval")
    inputs = stage.load(run_dir, settings)
    per_item, _ = stage.score_models(inputs, settings)
    prompts = [inputs.raw[p] for p in inputs.probed]
    answers = {name: items["answers"] for name, items in per_item.items()}
    out.write_text(json.dumps({"prompts": prompts, "answers": answers}))


def usual_reward(run_dir: Path, answers: Path, out: Path) -> None:
    """The reward loaded on its own and run on the sampled answers and the held-out pairs: the win rates."""
    from pipeline import preferences, records
    from stages.eval import win_rate
    from stages.eval.settings import EvalSettings

    settings = EvalSettings.of(run_config(run_dir).eval, "eval")
    anneal = records.load(run_dir, records.AnnealRecord)
    heldout = preferences.read_store(Path(anneal.outputs.reference_logps))["heldout"]
    data = json.loads(answers.read_text())
    reward = win_rate.load_reward(settings.win_rate.reward, settings.win_rate.batch_size)
    generations = {name: [tuple(a) for a in rows] for name, rows in data["answers"].items()}
    judged = win_rate.evaluate(
        reward,
        data["prompts"],
        generations,
        heldout,
        settings.win_rate,
        settings.bootstrap_resamples,
        settings.seed,
    )
    out.write_text(json.dumps(judged))


def lm_eval_values(folder: Path) -> dict:
    """Per task, per doc_id, the value lm-eval logged (the first filter's, as eval reads it)."""
    from stages.eval.benchmarks import PREFERRED

    values: dict = {}
    for path in sorted(folder.rglob("samples_*.jsonl")):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
            metric = next(key for key in PREFERRED if key in sample)
            values.setdefault(task, {}).setdefault(sample["doc_id"], float(sample[metric]))
    return values


def demo_run(work: Path, env: dict) -> Path:
    run_dir = work / "demo-run"
    subprocess.run(
        [sys.executable, "-m", "pipeline", "+merge=slerp", f"hydra.run.dir={run_dir}"], check=True, env=env, cwd=work
    )
    return run_dir


def compare(eval_dir: Path, usual_dir: Path, judged: dict) -> list[str]:
    """What differs between the two sides' results (empty: equal)."""
    report = json.loads((eval_dir / "eval" / "metrics.json").read_text())
    items = json.loads((eval_dir / "eval" / "items.json").read_text())["models"]
    differ = []
    for name, metrics in items.items():
        logged = lm_eval_values(usual_dir / "lm-eval" / name.replace(":", "_"))
        for task, run in metrics.get("benchmarks", {}).items():
            ours = {doc: value for (doc, _), value in zip(run["docs"], run["values"])}
            if ours != logged.get(task):
                differ.append(f"{name} {task}: items differ")
    ours = {k: v["win_rate"] for k, v in (report["win_rate"] or {}).get("vs", {}).items()}
    if ours != {k: v["win_rate"] for k, v in judged.get("vs", {}).items()}:
        differ.append(f"win rates differ: {ours} vs {judged.get('vs')}")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="compare", choices=["compare", "usual-score", "usual-reward"])
    parser.add_argument("--run", type=Path, help="a finished run folder; default: the demo's, made first")
    parser.add_argument("--answers", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.what == "usual-score":
        return usual_score(args.run, args.out)
    if args.what == "usual-reward":
        return usual_reward(args.run, args.answers, args.out)

    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO)}
    source = args.run.resolve() if args.run else demo_run(work, env)
    eval_dir, usual_dir = work / "eval-side", work / "usual-side"
    shutil.copytree(source, eval_dir)
    shutil.copytree(source, usual_dir)
    seconds = {
        "eval stage": timed(
            [sys.executable, "-m", "pipeline", "pipeline.stages=[eval]", f"hydra.run.dir={eval_dir}"], env
        )
    }
    for name, command in lm_eval_commands(eval_dir, usual_dir / "lm-eval"):
        seconds[f"lm-eval {name}"] = timed(command, env)
    answers, judged = usual_dir / "answers.json", usual_dir / "judged.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    seconds["usual-score"] = timed([*me, "usual-score", "--run", str(usual_dir), "--out", str(answers)], env)
    seconds["usual-reward"] = timed(
        [*me, "usual-reward", "--run", str(usual_dir), "--answers", str(answers), "--out", str(judged)], env
    )
    usual = sum(v for k, v in seconds.items() if k != "eval stage")
    for part, value in seconds.items():
        print(f"{part:28s} {value:8.1f} s")
    print(f"{'usual, in all':28s} {usual:8.1f} s")
    print(f"eval / usual: {seconds['eval stage'] / usual:.2f} (goal <= 0.70)")
    differ = compare(eval_dir, usual_dir, json.loads(judged.read_text()))
    print("results: equal (every benchmark document per model, the win rates)" if not differ else "\n".join(differ))
    print(f"run: {source}; work: {work}")


if __name__ == "__main__":
    main()
