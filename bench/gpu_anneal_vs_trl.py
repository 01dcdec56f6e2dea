"""GPU benchmark: the anneal stage against plain TRL DPO on a ~1B-parameter Llama, offline.

Builds random-init Llama parents locally (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, the
demo's 99-character vocabulary; a base and two children = base + seeded noise, saved as bf16 safetensors),
merges them once with the merge stage (linear), then times, each in a fresh process, variants alternating
order, medians over repeats:

  anneal   the anneal stage (`pipeline.stages=[anneal]`, `pipeline.cache=false`: its reference pass is part of
           the measured work), parent 0 as the reference;
  trl      plain TRL as a user writes it: `DPOTrainer(model=merged, ref_model=parent, args=DPOConfig(...))` with
           the parent resident and scored online, then `trainer.save_model`. DPOConfig is the stage's own
           (`stages.anneal.training.dpo_config`: same fields, bf16=True) with TRL's default
           precompute_ref_log_probs=False;
           both load the models in float32 (master weights, as the stage does) and train under bf16 autocast;
  *-lora   the same with `anneal=lora`; plain TRL passes the same LoraConfig and, for the stage's deliverable,
           also saves the adapter merged into the weights.

Several GPUs (`--processes N`): the stage runs with `distributed=ddp distributed.num_processes=N` (the pipeline
launches its ranks itself), plain TRL under `accelerate launch --config_file` with the accelerate config the
stage's launch writes (`stages.anneal.launch.accelerate_config`); the data is one epoch of steps x batch x N pairs.

Per run: wall time of the anneal work (imports excluded; with several processes the launch and the ranks' own
imports included, on both sides), tokens/s (TRL's `num_tokens`: non-pad tokens of chosen + rejected sequences,
prompt included, summed over ranks), model FLOPs utilisation = 8 * parameters * tokens / time / peak (each
training token's policy forward and backward, 6N, and its reference forward, 2N: the same work on both sides;
peak: a large bf16 matmul measured at start, times the processes; over the wall time and over the training time
with the reference's work in it: plain TRL's train_runtime, whose loop runs the reference forward, and the
stage's reference pass plus its train_runtime; 6N also for LoRA's policy, whose real work is nearer 4N), and peak
device memory
(`torch.cuda.max_memory_allocated` / `max_memory_reserved` of every process that used CUDA, each rank reporting
its own at exit through a sitecustomize probe on PYTHONPATH; the maximum over processes). Ratios are stage /
plain TRL; targets: time <= 1.0x, peak device memory <= 0.8x.

    python bench/gpu_anneal_vs_trl.py                        # one GPU, full fine-tuning and LoRA
    python bench/gpu_anneal_vs_trl.py --processes all        # DDP on every GPU (distributed=ddp / accelerate)
    python bench/gpu_anneal_vs_trl.py --json gpu-bench.json  # also write the results
    python bench/gpu_anneal_vs_trl.py --smoke                # CPU check: tiny model, 2 steps, 1 repeat, fp32
    python bench/gpu_anneal_vs_trl.py --smoke --processes 2  # the same through two gloo CPU processes per side
    python bench/gpu_anneal_vs_trl.py --real                 # the real case (bench/gpu.sh): below
    python bench/gpu_anneal_vs_trl.py --real --smoke         # its CPU check

`--real`: the CPU benchmark's real case at a 1B model's size: 256 training pairs (REAL_TRAIN_PAIRS) whose prompt,
chosen and rejected lengths are drawn from a real preference set's (bench/anneal_vs_trl.py: REAL_PAIR_TOKENS),
10 % of all pairs held out, TRL's max_length 1024, full fine-tuning; also the share of computed positions that
were padding (training forwards; reference forwards) and real tokens/s, as the CPU table prints them.
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # the pipeline, and the CPU benchmark beside this file
from anneal_vs_trl import (  # noqa: E402
    REAL_TRAIN_PAIRS,
    count_padding,
    make_parents,
    matmul_peaks,
    real_length_pairs,
    synthetic_pairs,
)

DIMS = {
    "1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192
    ),
    "smoke": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
}
TARGETS = {"time": 1.0, "memory": 0.8}  # stage / plain TRL, at most
# Loaded by every Python process of a run (PYTHONPATH): at exit, a process that used CUDA writes its peaks.
PROBE = """import atexit, json, os, sys
def _report_peak_device_memory():  # bench/gpu_anneal_vs_trl.py
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        with open(os.path.join(os.environ["GPU_BENCH_MEMORY_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()], f)
atexit.register(_report_peak_device_memory)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny model, 2 steps, 1 repeat, no bf16")
    parser.add_argument("--processes", default="1", help="GPUs (DDP), or `all`; --smoke: CPU processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="anneal.trainer.max_steps")
    parser.add_argument("--batch", type=int, default=8, help="anneal.trainer.per_device_train_batch_size (pairs)")
    parser.add_argument("--max-length", type=int, default=512, help="anneal.trainer.max_length (tokens)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--modes", default="full,lora", help="full fine-tuning, LoRA, or both")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--real", action="store_true", help="real-length pairs, 256 of them, max_length 1024")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rank", help=argparse.SUPPRESS)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.case)))
        return
    if args.rank:  # one rank of plain TRL under `accelerate launch`
        cfg, spec = compose_anneal(args.case, args.rank)
        log, main_process = plain_trl(cfg, args.run_dir, spec["parent"])
        if main_process:
            (args.run_dir / "trl-log.json").write_text(json.dumps(log))
        return

    import torch

    cuda = not args.smoke and torch.cuda.is_available()
    if not args.smoke and not cuda:
        raise SystemExit("gpu_anneal_vs_trl.py: no CUDA device here; run it on a GPU machine (or --smoke on a CPU)")
    available = torch.cuda.device_count() if cuda else 1
    processes = available if args.processes == "all" else int(args.processes)
    if processes < 1 or (cuda and processes > available):
        raise SystemExit(f"gpu_anneal_vs_trl.py: --processes {processes}, but this machine has {available} GPU(s)")
    if args.real:
        args.steps, args.max_length = REAL_TRAIN_PAIRS // args.batch, 1024
    if args.smoke:
        args.repeats, args.steps, args.batch = 1, 2, 2
        args.max_length = 1024 if args.real else 64
    if cuda:
        peak, device = cuda_matmul_peak() * processes, f"{torch.cuda.get_device_name()} x{processes}"
    else:
        peak, device = matmul_peaks()["fp32"] * 1e9, "CPU (fp32)"
    print(f"{device}: matmul peak {peak / 1e12:.2f} TFLOP/s ({'bf16' if cuda else 'fp32'})", flush=True)
    variants = [
        v
        for mode in args.modes.split(",")
        for v in {"full": ("anneal", "trl"), "lora": ("anneal-lora", "trl-lora")}[mode]
    ]
    work = Path(tempfile.mkdtemp(prefix="gpu-anneal-bench-"))
    try:
        case = prepare(work, DIMS["smoke" if args.smoke else "1b"], args, processes, cuda)
        (work / "probe").mkdir()
        (work / "probe" / "sitecustomize.py").write_text(PROBE)
        runs = {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # alternate the order
                runs[v].append(run_worker(v, case, work / "probe", cuda))
                last = runs[v][-1]
                print(
                    f"  {v:12s} rep {r}: wall {last['wall_s']:.1f} s, train {last['train_s']:.1f} s, peak device "
                    f"memory allocated (GiB) {gib(last['allocated'])}",
                    flush=True,
                )
        n_params = json.loads((case / "case.json").read_text())["n_params"]
        settings = {
            k: getattr(args, k) for k in ("steps", "batch", "max_length", "repeats", "activation_checkpointing", "real")
        }
        report = summarize(runs, n_params, peak, device, settings | {"processes": processes, "smoke": args.smoke})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def prepare(work: Path, dims: dict, args, processes: int, cuda: bool) -> Path:
    """bf16 parents, one linear merge through the merge stage, one epoch of synthetic pairs (steps x batch x
    processes), and the overrides that fix every anneal setting both sides use."""
    import torch
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR, models
    from pipeline.app import run_pipeline

    started = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # make_parents then builds, perturbs and saves bf16 weights
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it names its size "100m"; the count is printed below
            base, parents = make_parents(work / "parents", dims)
    finally:
        torch.set_default_dtype(default_dtype)
    for folder in (base, *parents):  # make_parents fixes 256 positions; RoPE has no table, the config says so
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = max(256, args.max_length)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    n_train = args.steps * args.batch * processes
    if args.real:  # a run's proportions: 10 % of all pairs held out
        n_heldout = max(1, round(n_train / 9))
        rows = real_length_pairs(n_train + n_heldout)
    else:
        n_heldout, completion_chars = args.batch, args.max_length // 5
        rows = synthetic_pairs(n_train + n_heldout, args.max_length - completion_chars - 4, completion_chars)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (work / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    overrides = [
        "+merge=linear",
        "models=local",
        f"models.base={base}",
        f"models.parents=[{parents[0]},{parents[1]}]",
        "data=custom",
        f"data.path={work / 'train.jsonl'}",
        f"data.heldout.path={work / 'heldout.jsonl'}",
        f"pipeline.cache_dir={work / 'cache'}",
        "anneal.reference=0",
        f"anneal.trainer.max_steps={args.steps}",
        f"anneal.trainer.per_device_train_batch_size={args.batch}",
        f"anneal.trainer.max_length={args.max_length}",
        "anneal.trainer.learning_rate=1e-6",
        f"anneal.trainer.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"anneal.trainer.bf16={str(cuda).lower()}",
        "anneal.trainer.save_strategy=no",
        # the last step must be logged: TRL's num_tokens is cumulative and only appears in the logs
        f"anneal.trainer.logging_steps={math.gcd(args.steps, max(1, args.steps // 4))}",
        "anneal.trainer.disable_tqdm=true",
        # plain TRL has no merge check (the merged model and the parents scored before the anneal): timed apart
        "pipeline.merge_check.texts=0",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "pipeline.stages=[merge]"])
    merged_dir = run_pipeline(cfg, work / "merged-run")["stages"]["merge"]["outputs"]["model"]
    n_params = models.count_parameters(merged_dir)
    print(
        f"parents and merge ready in {time.perf_counter() - started:.0f} s: Llama {n_params:,} parameters "
        f"({dims}), {n_train} training pairs, max_length {args.max_length}",
        flush=True,
    )
    spec = {
        "overrides": overrides,
        "parent": str(parents[0]),
        "n_params": n_params,
        "processes": processes,
        "cpu": not cuda,
        "real": args.real,
    }
    (work / "case.json").write_text(json.dumps(spec))
    return work


def run_worker(variant: str, case: Path, probe_dir: Path, cuda: bool) -> dict:
    """One measurement in a fresh process; peak device memory: the maximum over it and every process below it."""
    memory_dir = Path(tempfile.mkdtemp(prefix="memory-", dir=case))
    path = [str(probe_dir), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "GPU_BENCH_MEMORY_DIR": str(memory_dir),
        "TQDM_DISABLE": "1",
        **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""}),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--worker", variant, "--case", str(case)],
        capture_output=True,
        text=True,
        cwd=case,
        env=env,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker {variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    peaks = [json.loads(p.read_text()) for p in memory_dir.glob("*.json")] + [result.pop("own_memory") or [0, 0]]
    result["allocated"], result["reserved"] = (max(p[i] for p in peaks) or None for i in (0, 1))
    return result


def compose_anneal(case: Path, variant: str):
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR

    spec = json.loads((case / "case.json").read_text())
    overrides = [*spec["overrides"], "pipeline.stages=[anneal]", "pipeline.cache=false"]
    if variant.endswith("-lora"):
        overrides.append("anneal=lora")
    if spec["processes"] > 1:  # the stage: the pipeline launches the ranks; plain TRL: the same accelerate config
        overrides += [
            "distributed=ddp",
            f"distributed.num_processes={spec['processes']}",
            *(["distributed.use_cpu=true"] if spec["cpu"] else []),
        ]  # --smoke: gloo CPU processes
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides), spec


def worker(variant: str, case: Path) -> dict:
    """Wall time of the anneal work, TRL's logs, this process's peak device memory."""
    cfg, spec = compose_anneal(case, variant)
    import torch
    import trl  # noqa: F401  (imports are outside the measured work, on both sides)
    from omegaconf import OmegaConf

    from pipeline import manifest
    from pipeline.app import run_pipeline
    from stages.anneal import launch

    run_dir = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=case))
    manifest.save(run_dir, manifest.load(case / "merged-run"))
    cuda, processes = torch.cuda.is_available(), spec["processes"]
    padding = count_padding() if spec["real"] and processes == 1 else None  # this process's forwards
    if cuda and processes == 1:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if variant.startswith("anneal"):
        entry = run_pipeline(cfg, run_dir)["stages"]["anneal"]
        log = [json.loads(line) for line in Path(entry["outputs"]["metrics"]).read_text().splitlines()]
    elif processes == 1:
        log, _ = plain_trl(cfg, run_dir, spec["parent"])
    else:  # as a user launches a TRL script, with the accelerate config file the stage's launch writes
        config_file = run_dir / "accelerate.yaml"
        config_file.write_text(OmegaConf.to_yaml(launch.accelerate_config(cfg.distributed, processes)))
        env = {**os.environ, **({"ACCELERATE_USE_CPU": "true"} if spec["cpu"] else {})}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(config_file),
                __file__,
                "--rank",
                variant,
                "--case",
                str(case),
                "--run-dir",
                str(run_dir),
            ],
            check=True,
            env=env,
        )
        log = json.loads((run_dir / "trl-log.json").read_text())
    wall = time.perf_counter() - started
    own = (
        [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
        if cuda and torch.cuda.is_initialized()
        else None
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = [r for r in log if "num_tokens" in r]
    if not steps or steps[-1]["step"] != cfg.anneal.trainer.max_steps:
        raise RuntimeError(f"the last training step was not logged: {steps[-1:]}")
    final = next(r for r in log if "train_runtime" in r)
    # training with the reference's work in it on both sides: plain TRL's reference forward runs inside its loop,
    # the stage's reference pass before it
    reference_s = entry.get("seconds_by_phase", {}).get("reference_logps", 0.0) if variant.startswith("anneal") else 0
    return {
        "wall_s": wall,
        "train_s": final["train_runtime"] + reference_s,
        "tokens": steps[-1]["num_tokens"],
        "own_memory": own,
        "positions": json.loads(json.dumps(padding)) if padding else None,
    }


def plain_trl(cfg, run_dir: Path, parent: str):
    """What a user writes with TRL alone: the parent passed as ref_model, resident and scored online."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from pipeline import models, preferences, records
    from pipeline.settings import DataSettings
    from stages.anneal import perf, training
    from stages.anneal.settings import AnnealSettings

    merged_dir = records.load(run_dir, records.MergeRecord).outputs.model
    anneal = AnnealSettings.of(cfg.anneal, "anneal")
    precision = perf.decide_precision(anneal, models.count_parameters(merged_dir))
    args = training.dpo_config(anneal, run_dir / "trl", precision)  # the stage's DPOConfig, field for field
    args.precompute_ref_log_probs = False  # TRL's default: the reference scores every batch during training
    args.train_sampling_strategy = "random"  # TRL's default (its DPO drops the length column grouping needs)
    pairs, _ = preferences.load_preferences(DataSettings.of(cfg.data, "data"))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    lora = cfg.anneal.peft is not None
    peft_config = LoraConfig(**OmegaConf.to_container(cfg.anneal.peft, resolve=True)) if lora else None
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=pairs["train"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    out_dir = run_dir / "trl-model"
    trainer.save_model(str(out_dir / "adapter" if lora else out_dir))
    if lora and trainer.is_world_process_zero():  # the stage's deliverable: the adapter merged into the weights
        trainer.model.merge_and_unload().save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return trainer.state.log_history, trainer.is_world_process_zero()


def cuda_matmul_peak(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matmul on this GPU (after warm-up, best of 5 timings of 10)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds = []
    for _ in range(6):  # the first round warms up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / 10)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / min(seconds)


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def summarize(runs: dict, n_params: int, peak: float, device: str, settings: dict) -> dict:
    median = lambda rs, key: None if rs[0][key] is None else statistics.median(r[key] for r in rs)
    med = {
        v: {k: median(rs, k) for k in ("wall_s", "train_s", "tokens", "allocated", "reserved")}
        for v, rs in runs.items()
    }
    for m in med.values():  # each training token's policy forward + backward (6N) and reference forward (2N)
        flops = 8 * n_params * m["tokens"]
        m |= {
            "tokens_per_s": m["tokens"] / m["wall_s"],
            "mfu_wall": flops / m["wall_s"] / peak,
            "mfu_train": flops / m["train_s"] / peak,
        }
    print(
        f"\n== Llama {n_params / 1e6:.1f}M parameters on {device}; {settings['steps']} steps x "
        f"{settings['batch']} pairs x {settings['max_length']} tokens, {settings['repeats']} repeat(s), medians =="
    )
    print(
        "train s: training with the reference's work in it (plain TRL: its loop, the reference forward inside; "
        "the stage: its reference pass + its loop); MFU: 8 x parameters x training tokens / time / peak"
    )
    print(
        f"{'variant':12s}{'wall s':>8s}{'train s':>9s}{'tokens/s':>10s}{'MFU wall':>10s}{'MFU train':>11s}"
        f"{'peak alloc GiB':>16s}{'peak reserved GiB':>19s}"
    )
    for v, m in med.items():
        print(
            f"{v:12s}{m['wall_s']:8.2f}{m['train_s']:9.2f}{m['tokens_per_s']:10.0f}{m['mfu_wall']:10.1%}"
            f"{m['mfu_train']:11.1%}{gib(m['allocated']):>16s}{gib(m['reserved']):>19s}"
        )
    ratios = {}
    for mode, (stage, trl) in (("full", ("anneal", "trl")), ("lora", ("anneal-lora", "trl-lora"))):
        if stage not in runs:
            continue
        # time: the median of each repeat's own ratio (the two ran back to back); memory: ratio of the medians
        time_ratio = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs[stage], runs[trl]))
        memory_ratio = med[stage]["allocated"] / med[trl]["allocated"] if med[trl]["allocated"] else None
        ratios[mode] = {
            "time": time_ratio,
            "memory": memory_ratio,
            "reserved": med[stage]["reserved"] / med[trl]["reserved"] if med[trl]["reserved"] else None,
        }
        verdict = lambda x, key: (
            "n/a" if x is None else f"{x:.3f}x ({'meets' if x <= TARGETS[key] else 'misses'} <= {TARGETS[key]}x)"
        )
        print(
            f"{mode:5s} stage / plain TRL: time {verdict(time_ratio, 'time')}   "
            f"peak device memory {verdict(memory_ratio, 'memory')}"
        )
    padding = padding_shares(runs)
    for v, share in padding.items():
        print(
            f"  {v:12s} padding share of computed positions: training {share['train']:.1%}   reference "
            f"{share['reference']:.1%}   real tokens/s {med[v]['tokens_per_s']:.0f}"
        )
    return {
        "device": device,
        "n_params": n_params,
        "padding_share": padding,
        "peak_flops": peak,
        "settings": settings,
        "targets": TARGETS,
        "ratios": ratios,
        "medians": med,
        "runs": runs,
    }


def padding_shares(runs: dict) -> dict:
    """--real: per variant, the share of computed positions that were padding, training forwards (with gradients)
    against TRL's real training tokens, reference forwards (without) against the real tokens they scored."""
    shares = {}
    for v, rs in runs.items():
        if not rs[0].get("positions"):
            continue
        total = lambda kind, key, rs=rs: sum(r["positions"][kind][key] for r in rs)
        trained = sum(r["tokens"] for r in rs)
        shares[v] = {
            "train": 1 - trained / total("computed", "grad"),
            "reference": 1 - (total("real", "reference") or trained) / total("computed", "no_grad"),
        }
    return shares


if __name__ == "__main__":
    main()
