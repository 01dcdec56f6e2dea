"""Benchmark: merge-anneal's merge stage against bare `mergekit-yaml` on the same config, and the I/O floor,
side by side in one run.

    python bench/merge_vs_mergekit.py                          # ~100M and ~500M; linear, slerp, ties, dare_ties
    python bench/merge_vs_mergekit.py --sizes 100m --repeats 3 --json merge.json
    python bench/merge_vs_mergekit.py --sizes 100m --profile ties   # where mergekit's time goes, by function

Parents: a random Llama base and two children (base + seeded noise), stored in bf16 as hub checkpoints are; the
configs are the stage's own (conf/merge/<method>.yaml: float32 arithmetic and output). Each measurement is a
fresh process, as a user runs it; the variants alternate within each repetition and ratios are medians of the
repetitions' own ratios:

  stage     `python -m pipeline +merge=<method> pipeline.stages=[merge] pipeline.cache=false` (whole process);
  mergekit  `mergekit-yaml <the stage's resolved mergekit_config.yml> <out>` with every option the stage ran with;
  floor     a process that reads every tensor of the models the config names and writes one output's worth
            (the output's float32 shapes) with safetensors: no arithmetic. `floor io` is that process's reading
            and writing alone, `imports` a process that imports mergekit's merge module and exits;
  hit       the stage once more with the cache on, after one run filled it: the merge stage's own seconds
            (manifest) and the whole process; as root, `pipeline.cache_files=auto` copies the cached files into
            the run folder where the file system has no reflinks (ext4), so the hit is timed once more with
            read-only hard links (`cache_files=hardlink`, what `auto` does for a user who is not root).

Checks: the stage's and mergekit's outputs hold identical tensors (else the run stops).
"""

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from anneal_vs_trl import make_parents  # noqa: E402  (bench/ is on the path: the script's own folder)

VOCAB = 8192  # the parents' vocabulary (the demo's character tokenizer is copied along)
SIZES = {  # Llama dimensions
    "100m": dict(hidden_size=768, num_hidden_layers=10, num_attention_heads=12, intermediate_size=3072),
    "500m": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, intermediate_size=4096),
}
METHODS = ("linear", "slerp", "ties", "dare_ties")
VARIANTS = ("stage", "mergekit", "floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100m,500m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 at 100m, 2 above")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", help="cProfile mergekit's run_merge of this method (in-process, once)")
    parser.add_argument("--floor", nargs=3, help=argparse.SUPPRESS)  # worker: config, out dir, result file
    args = parser.parse_args()
    if args.floor:
        return floor_worker(*map(Path, args.floor))

    work = Path(tempfile.mkdtemp(prefix="merge-bench-"))
    report = {}
    try:
        for size in args.sizes.split(","):
            import torch

            base, (a, b) = make_parents(work / size / "parents", SIZES[size], vocab_size=VOCAB, dtype=torch.bfloat16)
            parents = {"base": base, "a": a, "b": b}
            if args.profile:
                profile(parents, args.profile, work / size)
                continue
            repeats = args.repeats or (3 if size == "100m" else 2)
            imports = statistics.median(
                timed([sys.executable, "-c", "import mergekit.merge, torch"], work) for _ in range(3)
            )
            report[size] = {
                "params_m": round(parameter_count(SIZES[size]) / 1e6, 1),
                "imports_s": round(imports, 2),
                "methods": {},
            }
            for method in args.methods.split(","):
                report[size]["methods"][method] = measure(method, parents, work / size / method, repeats)
                show(size, method, report[size])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if report:
        table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def parameter_count(dims: dict) -> int:
    h, i, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    return 2 * VOCAB * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h


def stage_command(method: str, parents: dict, run_dir: Path, cache_dir: Path, cache: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        f"+merge={method}",
        "models=local",
        f"models.base={parents['base']}",
        f"models.parents=[{parents['a']},{parents['b']}]",
        "pipeline.stages=[merge]",
        f"pipeline.cache={'true' if cache else 'false'}",
        f"pipeline.cache_dir={cache_dir}",
        "merge_options.quiet=true",
        f"hydra.run.dir={run_dir}",
    ]


def mergekit_command(config: Path, out: Path, options: dict) -> list[str]:
    """`mergekit-yaml` with every option the stage ran with (its record's merge_options: MergeOptions dumped
    whole), in the flags mergekit's own CLI declares for them (`mergekit.options.add_merge_options`)."""
    from mergekit.options import MergeOptions

    flags = []
    for name in MergeOptions.model_fields:
        value, flag = options.get(name), f"--{name.replace('_', '-')}"
        if value is None:  # not set: the CLI's default is None too
            continue
        if name == "verbosity":
            flags += ["-v"] * value
        elif name == "gpu_rich":  # a flag without a --no- form
            flags += [flag] if value else []
        elif isinstance(value, bool):
            flags.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            flags += [flag, str(value)]
    return [str(Path(sys.executable).parent / "mergekit-yaml"), str(config), str(out), *flags]


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def measure(method: str, parents: dict, folder: Path, repeats: int) -> dict:
    from safetensors.torch import load_file

    folder.mkdir(parents=True)
    config, options = folder / "mergekit_config.yml", None
    runs = {v: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # the first repetition starts with the stage: its resolved
        for variant in order:  # mergekit config and options are what the others run
            out = folder / f"{variant}-{r}"
            if variant == "stage":
                runs[variant].append(timed(stage_command(method, parents, out, folder / "cache-off", False), folder))
                if options is None:
                    record = json.loads((out / "manifest.json").read_text())["stages"]["merge"]
                    shutil.copyfile(record["outputs"]["config"], config)
                    options = record["config"]["merge_options"]
            elif variant == "mergekit":
                runs[variant].append(timed(mergekit_command(config, out, options), folder))
            else:
                runs[variant].append(
                    timed([sys.executable, __file__, "--floor", str(config), str(out), str(out / "io.json")], folder)
                )
                runs.setdefault("floor_io", []).append(json.loads((out / "io.json").read_text())["seconds"])
        ours = load_file(folder / f"stage-{r}" / "merge" / "model" / "model.safetensors")
        theirs = load_file(folder / f"mergekit-{r}" / "model.safetensors")
        if ours.keys() != theirs.keys() or any(not ours[k].equal(theirs[k]) for k in ours):
            raise SystemExit(f"{method}: the stage's and mergekit's tensors differ")
        for variant in order:
            shutil.rmtree(folder / f"{variant}-{r}")
    # the cache: fill it, then the same merge again
    cache = folder / "cache"
    timed(stage_command(method, parents, folder / "fill", cache, cache=True), folder)
    hit_process = timed(stage_command(method, parents, folder / "hit", cache, cache=True), folder)
    hit = json.loads((folder / "hit" / "manifest.json").read_text())["stages"]["merge"]
    assert hit["cache"]["merge"] == "hit", hit["cache"]
    # the same with read-only hard links instead of copies (what cache_files=auto does for a user who is not root)
    timed(
        stage_command(method, parents, folder / "hit-linked", cache, cache=True) + ["pipeline.cache_files=hardlink"],
        folder,
    )
    linked = json.loads((folder / "hit-linked" / "manifest.json").read_text())["stages"]["merge"]
    assert linked["cache"]["merge"] == "hit", linked["cache"]
    shutil.rmtree(folder, ignore_errors=True)
    ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(runs[a], runs[b])), 3)
    return {
        "seconds": {v: round(statistics.median(t), 2) for v, t in runs.items()},
        "stage_over_mergekit": ratio("stage", "mergekit"),
        "mergekit_over_floor": ratio("mergekit", "floor"),
        "identical_tensors": True,
        "hit_stage_s": round(hit["seconds"], 3),
        "hit_process_s": round(hit_process, 2),
        "hit_hardlink_stage_s": round(linked["seconds"], 3),
        "copies": os.geteuid() == 0,
    }


def floor_worker(config: Path, out: Path, result: Path) -> None:
    """Read every tensor of the models `config` names; write one float32 output of the first model's shapes."""
    import torch
    import yaml
    from safetensors import safe_open
    from safetensors.torch import save_file

    spec = yaml.safe_load(config.read_text())
    names = {m["model"] for m in spec.get("models", [])} | ({spec["base_model"]} if spec.get("base_model") else set())
    started = time.perf_counter()
    output = None
    for name in sorted(names):
        with safe_open(str(Path(name) / "model.safetensors"), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        output = output or {key: t.to(torch.float32) for key, t in tensors.items()}
    out.mkdir(parents=True)
    save_file(output, str(out / "model.safetensors"))
    result.write_text(json.dumps({"seconds": time.perf_counter() - started}))


def profile(parents: dict, method: str, folder: Path) -> None:
    """mergekit's run_merge of the stage's config, in this process under cProfile: the top functions."""
    timed(stage_command(method, parents, folder / "p", folder / "pc", cache=False), folder)
    record = json.loads((folder / "p" / "manifest.json").read_text())["stages"]["merge"]
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(Path(record["outputs"]["config"]).read_text()))
    options = MergeOptions(**{k: v for k, v in record["config"]["merge_options"].items() if v is not None})
    profiler = cProfile.Profile()
    profiler.runcall(run_merge, config, str(folder / "profiled"), options=options)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def show(size: str, method: str, report: dict) -> None:
    m = report["methods"][method]
    s = m["seconds"]
    print(
        f"  {size} {method:10s} stage {s['stage']:.1f} s  mergekit {s['mergekit']:.1f} s  floor {s['floor']:.1f} s "
        f"(io {s['floor_io']:.1f} s)  stage/mergekit {m['stage_over_mergekit']}  mergekit/floor "
        f"{m['mergekit_over_floor']}  cache hit: stage {m['hit_stage_s']} s, process {m['hit_process_s']} s, "
        f"stage with hard links {m['hit_hardlink_stage_s']} s",
        flush=True,
    )


def table(report: dict) -> None:
    print(
        "\n| size | method | stage s | mergekit-yaml s | stage / mergekit | I/O floor s (process; I/O alone) | "
        "mergekit / floor | (mergekit - imports) / I/O | cache hit: stage s (process s) | hit, hard links: stage s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report.values():
        for method, m in r["methods"].items():
            s = m["seconds"]
            compute = (s["mergekit"] - r["imports_s"]) / s["floor_io"]
            print(
                f"| {r['params_m']}M | {method} | {s['stage']:.1f} | {s['mergekit']:.1f} | "
                f"{m['stage_over_mergekit']} | {s['floor']:.1f}; {s['floor_io']:.1f} | {m['mergekit_over_floor']} | "
                f"{compute:.1f} | {m['hit_stage_s']} ({m['hit_process_s']}) | {m['hit_hardlink_stage_s']} |"
            )
    imports = ", ".join(f"{size}: {r['imports_s']} s" for size, r in report.items())
    print(f"(imports: a process importing mergekit.merge and torch, {imports})")


if __name__ == "__main__":
    main()
