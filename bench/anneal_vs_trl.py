"""Benchmark: merge-anneal's anneal stage against a plain TRL DPO script, side by side in one run.

Plain TRL here is what a user would write: `DPOTrainer(model=merged, ref_model=parent, ...)`, the parent
resident next to the policy and scored online. Everything else is equal: the data (one epoch of exactly
steps x batch pairs), batch, steps, max_length, dtype (fp32 master weights, bf16 autocast by the same
`auto` rule), optimizer and the deliverable (a full model saved with its tokenizer; with LoRA, the adapter
merged into the weights). Each measurement is its own process; variants alternate; medians are printed.

    python bench/anneal_vs_trl.py --quick              # < 10 minutes on 2 CPU cores
    python bench/anneal_vs_trl.py --json bench.json    # writes rss_ratio / time_ratio for the ~100M case
    python bench/anneal_vs_trl.py --sizes real --quick # real-length pairs: padding share and real tokens/s
    python bench/anneal_vs_trl.py --sizes 100m --switches --repeats 2  # each anneal.perf switch off, against on
    python bench/anneal_vs_trl.py --sizes real --profile  # where the stage's time goes: torch.profiler, 8 steps

Variants: `anneal` (one run of the stage, reference log-probs computed: what an independent run spends),
`trl` (plain TRL), the two with LoRA, and `sweep4`: a 4-point merge sweep as Hydra's basic launcher runs it,
the anneal stage on four merged models (linear, four weights) one after another in one process, sharing the
reference log-prob cache (the first job computes it). Ratios are medians over repetitions of each
repetition's own ratio; the sweep ratio is the sweep's anneal time over four times an independent run's.

Case `real`: a run's shape at a size 2 CPU cores train in minutes. A 14.2M Llama (the 10m case's dimensions)
under bf16 autocast, as a real run on a GPU, on 256 training pairs (REAL_TRAIN_PAIRS) with 10 % of all pairs held
out (28), whose prompt, chosen and rejected lengths are drawn from a real preference data set's (REAL_PAIR_TOKENS:
the source is named there; one character per token), at TRL's max_length 1024. TRL pads every batch to its longest
row, so the case reports, for every variant, the share of computed token positions that were padding (training
forwards; reference forwards), real tokens per second (the non-padding tokens trained on over the whole anneal's
wall time, reference pass included) against plain TRL, and the training loop alone against plain TRL's (which
holds its reference forwards), each the median and min-max over the repetitions; and, from the first repetition,
held-out preference accuracy on 64 more pairs of the same lengths, paired against the stage (`anneal`, its
defaults: packing and length-grouped batches). Variants: `anneal-random` (TRL's random batches, packing on),
`anneal-padded` (anneal.perf.pack_rows=false; not with --quick). --quick: two repetitions, `anneal-random` once,
about 14 minutes on 2 cores.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP_WEIGHTS = (0.2, 0.4, 0.6, 0.8)  # the merge sweep: parent a's linear weight (parent b's is 0.5)
SIZES = {
    # name: Llama dimensions (vocab: the demo's 99-character tokenizer), prompt / completion characters
    "demo": None,  # the embedded demo parents and data
    # the smaller sizes of bench/scaling.py
    "1m": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        prompt_chars=100,
        completion_chars=30,
    ),
    "10m": dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=1536,
        prompt_chars=100,
        completion_chars=30,
    ),
    "100m": dict(
        hidden_size=768,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=3072,
        prompt_chars=100,
        completion_chars=30,
    ),
    "real": dict(  # the 10m model's dimensions: 256 pairs of up to 2 x 1024 tokens in minutes on 2 cores
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=1536,
        max_length=1024,
    ),  # TRL's default max_length
}
# Real preference pairs' lengths, (prompt, chosen, rejected) in tokens (approximately: characters / 4, prompt =
# every turn of the conversation), measured on the 19 complete records of 8 evenly spaced 16 kB chunks of
# LLaMA-Factory's English DPO demo set (github.com/hiyouga/LLaMA-Factory, data/dpo_en_demo.json at commit
# 3075df156a6520392aecf5e30bf888b621c0959c; a sample of real UltraFeedback- and Capybara-style DPO pairs). Quantiles
# p10 / p50 / p90 / max: prompt 14 / 145 / 576 / 768, chosen 5 / 232 / 676 / 884, rejected 57 / 240 / 645 / 818.
# Records longer than a chunk could not be measured, so the real tail is heavier than this: padding is understated.
REAL_CHECK_PAIRS = 64  # beside the run, for the check of the trained models (case `real`)
REAL_TRAIN_PAIRS = 256  # case `real`: a run's proportions, 256 training pairs and 10 % of all pairs held out
REAL_PAIR_TOKENS = (
    (28, 422, 137),
    (572, 232, 231),
    (13, 651, 276),
    (11, 530, 183),
    (187, 366, 421),
    (24, 6, 50),
    (768, 452, 743),
    (185, 116, 212),
    (222, 156, 240),
    (20, 775, 136),
    (594, 325, 621),
    (544, 603, 508),
    (79, 96, 59),
    (145, 3, 502),
    (436, 2, 162),
    (32, 884, 818),
    (27, 222, 284),
    (538, 31, 310),
    (14, 20, 51),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps (< 10 min on 2 cores)")
    parser.add_argument("--json", type=Path, help="write the ~100M results (rss_ratio, time_ratio, ...) here")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sizes", default="demo,100m")
    parser.add_argument("--runs-log", type=Path, help="append each measurement here (JSON lines) as it lands")
    parser.add_argument(
        "--switches",
        action="store_true",
        help="the stage with each anneal.perf switch off in turn, against all on (no plain TRL)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="one run of the stage (8 steps) under torch.profiler: where time goes"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--heldout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "profile":
        profile_worker(args.case)
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.case, args.heldout)))
        return

    work = Path(tempfile.mkdtemp(prefix="anneal-bench-"))
    peaks = matmul_peaks()
    print(f"matmul peak on this machine: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    report = {}
    try:
        for size in args.sizes.split(","):
            steps, batch = {"100m": (8, 4), "real": (REAL_TRAIN_PAIRS // 8, 8)}.get(
                size, (60 if args.quick else 250, 16)
            )
            variants = {
                "100m": ["anneal", "trl", "sweep4", "anneal-lora", "trl-lora"],
                "real": ["anneal", "trl", "anneal-random"] + ([] if args.quick else ["anneal-padded"]),
            }.get(size, ["anneal", "trl"] + ([] if args.quick else ["sweep4"]))
            if args.switches:
                variants = switch_variants()
            repeats = args.repeats or (5 if not args.quick else 2 if size == "real" else 3)
            case = prepare(size, work / size, steps, batch, sweep="sweep4" in variants)
            if args.profile:
                subprocess.run([sys.executable, __file__, "--worker", "profile", "--case", str(case)], check=True)
                continue
            runs = {v: [] for v in variants}
            for r in range(repeats):
                for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # alternate the order
                    if v in ("sweep4", "anneal-random") and args.quick and r > 0:
                        continue  # --quick times the sweep (four anneals) and TRL's random order once
                    runs[v].append(run_worker(v, case, heldout=size == "real" and r == 0))
                    last = runs[v][-1]
                    if args.runs_log:  # every measurement as it lands, so a stopped run keeps what it measured
                        with args.runs_log.open("a") as log:
                            log.write(json.dumps({"size": size, "variant": v, "rep": r, "result": last}) + "\n")
                    phases = " ".join(f"{k} {t:.1f}" for k, t in last.get("phases", {}).items())
                    print(
                        f"  {size} {v:12s} rep {r}: {last['wall_s']:.1f} s, {last['peak_rss_mb']:.0f} MB"
                        + (f"  ({phases})" if phases else ""),
                        flush=True,
                    )
            report[size] = summarize_switches(size, runs) if args.switches else summarize(size, runs, peaks, case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report.get("100m", report), indent=2) + "\n")
        print(f"wrote {args.json}")


def prepare(size: str, case_dir: Path, steps: int, batch: int, sweep: bool = True) -> Path:
    """Parents, a merged model (merge stage) and one epoch of preference data for the case."""
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR, demo
    from pipeline.app import run_pipeline

    case_dir.mkdir(parents=True)
    cache = Path(os.environ.get("MERGE_ANNEAL_CACHE", "~/.cache/merge-anneal")).expanduser()
    n_train = steps * batch
    n_heldout = round(n_train / 9) if size == "real" else batch  # real: 10 % of all pairs
    if size == "demo":
        root = demo.ensure_demo(cache)
        base, parents = root / "base", [root / "add", root / "reverse"]
        rows = [
            json.loads(line)
            for split in ("train", "heldout")  # held-out pairs after all 4000 training ones
            for line in (root / "data" / f"{split}.jsonl").read_text().splitlines()
        ]
        max_length = 64
    elif size == "real":
        base, parents = make_parents(case_dir / "parents", SIZES[size])
        rows = real_length_pairs(n_train + n_heldout + REAL_CHECK_PAIRS)
        max_length = SIZES[size]["max_length"]
    else:
        base, parents = make_parents(case_dir / "parents", SIZES[size])
        rows = synthetic_pairs(n_train + n_heldout, SIZES[size]["prompt_chars"], SIZES[size]["completion_chars"])
        max_length = SIZES[size]["prompt_chars"] + SIZES[size]["completion_chars"] + 4
    if size == "real":  # pairs for the held-out check of the trained models (eval's scoring, not timed)
        rows, check = rows[: n_train + n_heldout], rows[n_train + n_heldout :]
        (case_dir / "check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in check))
    rows = rows[: n_train + n_heldout]
    (case_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (case_dir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    overrides = [
        "+merge=linear",
        "models=local",
        f"models.base={base}",
        f"models.parents=[{parents[0]},{parents[1]}]",
        "data=custom",
        f"data.path={case_dir / 'train.jsonl'}",
        f"data.heldout.path={case_dir / 'heldout.jsonl'}",
        f"pipeline.cache_dir={case_dir / 'cache'}",
        f"models.cache_dir={cache}",
        "anneal.reference=0",
        f"anneal.trainer.max_steps={steps}",
        f"anneal.trainer.per_device_train_batch_size={batch}",
        f"anneal.trainer.max_length={max_length}",
        "anneal.trainer.save_strategy=no",
        f"anneal.trainer.logging_steps={max(1, steps // 4)}",
        "anneal.trainer.disable_tqdm=true",
        # fixed here, not left to the defaults (TRL's, for real models): the settings every earlier figure used
        "anneal.trainer.learning_rate=3e-4",
        "anneal.trainer.lr_scheduler_type=cosine",
        "anneal.trainer.seed=0",
        "anneal.trainer.activation_checkpointing=false",
        # plain TRL has no merge check (the merged model and the parents scored before the anneal): timed apart
        "pipeline.merge_check.texts=0",
        # real: bf16 autocast, as a real run on a GPU (`auto` leaves it off below 30M parameters on a CPU)
        *(["anneal.trainer.bf16=true"] if size == "real" else []),
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "pipeline.stages=[merge]"])
    run_pipeline(cfg, case_dir / "merged-run")
    for i, weight in enumerate(SWEEP_WEIGHTS if sweep else ()):  # the merge sweep's four merged models
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[*overrides, "pipeline.stages=[merge]", f"merge.models.0.parameters.weight={weight}"],
            )
        run_pipeline(cfg, case_dir / f"sweep-merged-{i}")
    (case_dir / "case.json").write_text(
        json.dumps({"overrides": overrides, "steps": steps, "batch": batch, "parent": str(parents[0])})
    )
    return case_dir


def make_parents(folder: Path, dims: dict, vocab_size: int | None = None, dtype=None):
    """A random Llama base and two children (base + seeded noise), the demo tokenizer; `vocab_size` (default: the
    tokenizer's) and `dtype` (default: torch's default dtype) as stored."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo.build import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=dims.get("max_length", 256),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{k: v for k, v in dims.items() if not k.endswith("_chars") and k != "max_length"},
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    for name, seed in (("a", 1), ("b", 2)):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.002)
        (model.to(dtype) if dtype else model).save_pretrained(folder / name)
    (base.to(dtype) if dtype else base).save_pretrained(folder / "base")  # last: .to() converts it in place
    paths = [folder / name for name in ("base", "a", "b")]
    for path in paths:
        tokenizer.save_pretrained(path)
    print(f"  parents: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters")
    return paths[0], paths[1:]


def synthetic_pairs(n: int, prompt_chars: int, completion_chars: int) -> list[dict]:
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    text = lambda k: "".join(rng.choice(letters) for _ in range(k))
    return [
        {"prompt": text(prompt_chars), "chosen": text(completion_chars), "rejected": text(completion_chars)}
        for _ in range(n)
    ]


def real_length_pairs(n: int) -> list[dict]:
    """n pairs whose (prompt, chosen, rejected) lengths are drawn from REAL_PAIR_TOKENS (seeded), one character
    per token of the demo's character tokenizer."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    text = lambda k: "".join(rng.choice(letters) for _ in range(max(1, k)))
    return [dict(zip(("prompt", "chosen", "rejected"), map(text, rng.choice(REAL_PAIR_TOKENS)))) for _ in range(n)]


def count_padding() -> dict:
    """Token positions in this process: real ones (non-padding) of every batch TRL's preference collator builds,
    the stage's reference pass (TRL's precompute) apart from training; and computed ones, every forward of the
    Llama backbone with and without gradients (the policy's training forwards; the reference's). Packing
    (anneal.perf.pack_rows) computes fewer positions than the collator's padded batch holds."""
    import traceback

    import torch
    from transformers.models.llama import modeling_llama
    from trl.trainer import dpo_trainer

    counts = {"real": {"train": 0, "reference": 0}, "computed": {"grad": 0, "no_grad": 0}}
    collate, forward = dpo_trainer.DataCollatorForPreference.torch_call, modeling_llama.LlamaModel.forward

    def collated(self, examples):
        batch = collate(self, examples)
        phase = "reference" if any(f.name == "_precompute_ref_logps" for f in traceback.extract_stack()) else "train"
        counts["real"][phase] += int(batch["attention_mask"].sum())
        return batch

    def computed(self, input_ids=None, *args, **kwargs):
        if input_ids is not None:
            counts["computed"]["grad" if torch.is_grad_enabled() else "no_grad"] += input_ids.numel()
        return forward(self, input_ids, *args, **kwargs)

    dpo_trainer.DataCollatorForPreference.torch_call = collated
    modeling_llama.LlamaModel.forward = computed
    return counts


def run_worker(variant: str, case: Path, heldout: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", variant, "--case", str(case), *(["--heldout"] if heldout else [])],
        capture_output=True,
        text=True,
        cwd=case,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def worker(variant: str, case: Path, heldout: bool = False) -> dict:
    """One measurement in a fresh process: wall time of the anneal work, tokens, peak RSS; with `heldout`, then
    (untimed) whether the trained model prefers each held-out pair's chosen answer."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TQDM_DISABLE", "1")
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR, manifest

    spec = json.loads((case / "case.json").read_text())
    overrides = list(spec["overrides"])
    lora = variant.split("-no-")[0].endswith("-lora")
    if lora:
        overrides.append("anneal=lora")
    if "-no-" in variant:  # --switches: this one anneal.perf switch off
        switch = variant.split("-no-")[1]
        overrides.append(f"anneal.perf.{switch}={'null' if switch == 'reference_pass_tokens' else 'false'}")
    if variant.startswith("anneal"):
        overrides.append("pipeline.cache=false")  # the reference pass is part of the measured work
    if variant == "anneal-padded":  # without packing (the reference pass then also meets its pairs in order)
        overrides.append("anneal.perf.pack_rows=false")
    if variant == "anneal-random":  # packing, and TRL's random batches instead of the default length-grouped ones
        overrides.append("anneal.trainer.train_sampling_strategy=random")
    if variant == "sweep4":  # a cache of its own, empty: the sweep's first job computes the reference pass
        overrides = [o for o in overrides if not o.startswith("pipeline.cache_dir=")]
        overrides.append(f"pipeline.cache_dir={tempfile.mkdtemp(prefix='sweep-cache-', dir=case)}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "pipeline.stages=[anneal]"])
    run_dir = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=case))
    manifest.save(run_dir, manifest.load(case / "merged-run"))
    import trl  # noqa: F401

    from stages import anneal

    padding = count_padding()

    if variant == "sweep4":
        return sweep_worker(cfg, case, run_dir)
    process = ProcessCounters()
    started = time.perf_counter()
    phases = {}
    if variant.startswith("anneal"):
        entry = anneal.run(cfg, run_dir).model_dump(mode="json")
        log = [json.loads(line) for line in Path(entry["outputs"]["metrics"]).read_text().splitlines()]
        bf16 = entry["precision"]["autocast"] == "bfloat16"
        phases = entry["seconds_by_phase"]
        model_dir = Path(entry["outputs"]["model"])
    else:
        log, bf16 = plain_trl(cfg, run_dir, spec["parent"], lora)
        model_dir = run_dir / "trl-model"
    wall = time.perf_counter() - started
    counters = process.read()
    final = [r for r in log if "train_runtime" in r][-1]
    tokens = max(r.get("num_tokens", 0) for r in log)
    peak, positions = peak_rss_mb(), json.loads(json.dumps(padding))  # before the (untimed) held-out check
    correct = heldout_correct(model_dir, case / "check.jsonl", cfg.anneal.trainer.max_length) if heldout else None
    shutil.rmtree(run_dir, ignore_errors=True)
    # training time with the reference's work in it on both sides: plain TRL's reference forward runs inside its
    # training loop (train_runtime), the stage's before it (its reference pass, which scores the held-out pairs too)
    train_s = final["train_runtime"] + phases.get("reference_logps", 0.0)
    return {
        "wall_s": wall,
        "train_s": train_s,
        "loop_s": final["train_runtime"],  # the training loop alone (plain TRL's: with its reference forwards)
        "tokens": tokens,
        "bf16": bf16,
        "peak_rss_mb": peak,
        "phases": phases,
        "positions": positions,
        "heldout_correct": correct,
        **counters,
    }


# torch operators by kind, for --profile (self CPU time, in the order tried)
OP_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int"),
    "attention": ("attention", "aten::_scaled_dot_product", "aten::_flash", "aten::_efficient"),
    "optimizer": ("Optimizer.step", "aten::_foreach", "adamw", "aten::lerp", "aten::addcdiv", "aten::addcmul"),
    "casts and copies": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat"),
    "log-softmax and loss": ("log_softmax", "aten::gather", "aten::logsumexp", "nll"),
}


def profile_worker(case: Path) -> None:
    """The stage once (the case's data and settings, 8 training steps) under torch.profiler; prints self CPU time
    by kind of operator and the top operators."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TQDM_DISABLE", "1")
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR, manifest
    from stages import anneal

    spec = json.loads((case / "case.json").read_text())
    overrides = [o for o in spec["overrides"] if not o.startswith("anneal.trainer.max_steps=")]
    overrides += ["anneal.trainer.max_steps=8", "pipeline.cache=false", "pipeline.stages=[anneal]"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="profile-", dir=case))
    manifest.save(run_dir, manifest.load(case / "merged-run"))
    import trl  # noqa: F401

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        phases = anneal.run(cfg, run_dir).seconds_by_phase
    wall = time.perf_counter() - started
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    kinds = collections.Counter()
    for e in events:
        kind = next((k for k, names in OP_KINDS.items() if any(n in e.key for n in names)), "other")
        kinds[kind] += e.self_cpu_time_total
    print(f"\nprofile: the stage, 8 steps, {wall:.1f} s wall under the profiler; phases {phases}")
    print("self CPU time by kind of operator (both threads' work, summed):")
    for kind, us in kinds.most_common():
        print(f"  {kind:22s} {us / 1e6:8.2f} s  {us / total:6.1%}")
    print("top operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"  {e.key[:60]:60s} {seconds:8.2f} s  {e.self_cpu_time_total / total:6.1%}  x{e.count}")


def heldout_correct(model_dir: Path, pairs: Path, max_length: int) -> list[int]:
    """Per held-out pair, 1 where the model gives its chosen answer the higher log-prob (eval's scoring)."""
    from pipeline import scoring

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    return scoring.chosen_preferred(model_dir, rows, max_length, "keep_start", batch_size=8).int().tolist()


def sweep_worker(cfg, case: Path, run_dir: Path) -> dict:
    """The anneal stage of a 4-point merge sweep, as Hydra's basic launcher runs it: one process, one job after
    another, one reference log-prob cache."""
    from pipeline import manifest
    from stages import anneal

    jobs, walls = [], []
    started = time.perf_counter()
    for i in range(len(SWEEP_WEIGHTS)):
        job_dir = run_dir / f"job{i}"
        manifest.save(job_dir, manifest.load(case / f"sweep-merged-{i}"))
        job_started = time.perf_counter()
        entry = anneal.run(cfg, job_dir).model_dump(mode="json")
        walls.append(time.perf_counter() - job_started)
        jobs.append(entry["cache"]["reference_logps"])
    wall = time.perf_counter() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "wall_s": wall,
        "train_s": None,
        "tokens": None,
        "bf16": None,  # four trainings: no single figure
        "peak_rss_mb": peak_rss_mb(),
        "phases": {f"job{i} ({c})": w for i, (c, w) in enumerate(zip(jobs, walls))},
    }


# The anneal.perf switches that act on a full fine-tuning run, and the one that acts under LoRA alone.
FULL_SWITCHES = (
    "lean_saved_tensors",
    "float32_attention",
    "reference_weights_bf16",
    "reference_pass_tokens",
    "pack_rows",
    "malloc_keeps_freed_memory",
    "gc_skips_existing_objects",
    "fingerprint_in_background",
    "skip_trl_model_hash",
)
LORA_SWITCHES = ("frozen_weights_bf16",)


def switch_variants() -> list[str]:
    """--switches: the stage with every switch on, then with each switch off in turn (full fine-tuning), and the same
    for LoRA's own switch."""
    return [
        "anneal",
        *(f"anneal-no-{s}" for s in FULL_SWITCHES),
        "anneal-lora",
        *(f"anneal-lora-no-{s}" for s in LORA_SWITCHES),
    ]


class ProcessCounters:
    """This process's minor page faults and system CPU seconds from now, and the full (generation 2) garbage
    collections run from now with their seconds."""

    def __init__(self):
        import gc

        self.gc_runs, self.gc_seconds, self._started = 0, 0.0, None
        gc.callbacks.append(self._on_gc)
        self.usage = resource.getrusage(resource.RUSAGE_SELF)

    def _on_gc(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.gc_runs, self.gc_seconds = self.gc_runs + 1, self.gc_seconds + time.perf_counter() - self._started

    def read(self) -> dict:
        now = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "minor_faults": now.ru_minflt - self.usage.ru_minflt,
            "system_s": now.ru_stime - self.usage.ru_stime,
            "full_gc_runs": self.gc_runs,
            "full_gc_s": self.gc_seconds,
        }


def summarize_switches(size: str, runs: dict) -> dict:
    """Per variant the medians; per switch, off against on (the median of each repetition's own ratio)."""
    keys = ("wall_s", "train_s", "reference_s", "peak_rss_mb", "minor_faults", "system_s", "full_gc_runs", "full_gc_s")
    for rs in runs.values():
        for r in rs:
            r["reference_s"] = r["phases"].get("reference_logps")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in runs.items()}
    print(
        f"\n== {size}: each anneal.perf switch off against all on; medians of {len(runs['anneal'])} repetitions; "
        f"bf16 autocast {runs['anneal'][0]['bf16']} =="
    )
    print(
        "train s: the reference pass + the training loop; faults: minor page faults; full GC: generation-2 collections"
    )
    print(
        f"{'variant':44s}{'wall s':>8s}{'train s':>9s}{'ref s':>7s}{'peak RSS MB':>12s}{'faults':>10s}"
        f"{'system s':>10s}{'full GC':>8s}{'GC s':>7s}"
    )
    for v, m in med.items():
        print(
            f"{v:44s}{m['wall_s']:8.2f}{m['train_s']:9.2f}{m['reference_s']:7.2f}{m['peak_rss_mb']:12.0f}"
            f"{m['minor_faults']:10.0f}{m['system_s']:10.2f}{m['full_gc_runs']:8.0f}{m['full_gc_s']:7.2f}"
        )
    ratios = {}
    for v in runs:
        if "-no-" not in v:
            continue
        off, on = runs[v], runs[v.split("-no-")[0]]
        ratios[v] = {
            k: round(statistics.median(a[k] / b[k] for a, b in zip(off, on) if b[k]), 3)
            for k in ("wall_s", "train_s", "reference_s", "peak_rss_mb", "minor_faults", "system_s")
        }
    print("off / on, paired per repetition:")
    for v, r in ratios.items():
        print(f"  {v:42s} " + "  ".join(f"{k} {x}" for k, x in r.items()))
    return {"size": size, "medians": med, "off_over_on": ratios}


def peak_rss_mb() -> float:
    """This process's own peak RSS. Linux's VmHWM belongs to the process image; ru_maxrss would not do: it
    keeps the high-water mark of the image that exec replaced, i.e. of the (big) parent that spawned it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_trl(cfg, run_dir: Path, parent: str, lora: bool):
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
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    anneal = AnnealSettings.of(cfg.anneal, "anneal")
    args = training.dpo_config(
        anneal, run_dir / "trl", perf.decide_precision(anneal, models.count_parameters(merged_dir))
    )
    args.precompute_ref_log_probs = False
    args.train_sampling_strategy = "random"  # TRL's default (its DPO drops the length column grouping needs)
    pairs, _ = preferences.load_preferences(DataSettings.of(cfg.data, "data"))
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    peft_config = LoraConfig(**OmegaConf.to_container(cfg.anneal.peft)) if lora else None
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=pairs["train"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    # the same deliverable as the stage's: a full model (with LoRA: the adapter merged into the weights)
    (trainer.model.merge_and_unload() if lora else trainer.model).save_pretrained(run_dir / "trl-model")
    tokenizer.save_pretrained(run_dir / "trl-model")
    return trainer.state.log_history, args.bf16


def matmul_peaks() -> dict:
    """GFLOP/s of a large square matmul, fp32 and bf16, best of a few tries."""
    import torch

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        peaks[name] = 2 * 2048**3 / best / 1e9
    return peaks


def summarize(size: str, runs: dict, peaks: dict, case: Path) -> dict:
    from pipeline import models, records

    med = {
        v: {
            k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None
            for k in ("wall_s", "train_s", "tokens", "peak_rss_mb")
        }
        for v, rs in runs.items()
    }
    n_params = models.count_parameters(records.load(case / "merged-run", records.MergeRecord).outputs.model)
    bf16 = runs["trl"][0]["bf16"]
    peak = peaks["bf16" if bf16 else "fp32"]
    out = {
        "size": size,
        "params_m": round(n_params / 1e6, 1),
        "autocast_bf16": bf16,
        "medians": med,
        "matmul_peak_gflops": round(peak),
    }
    # the same work on both sides: each training token's policy forward + backward (6 FLOP per parameter) and its
    # reference forward (2), over training time with the reference's work in it (`train_s`: plain TRL's loop; the
    # stage's reference pass + its loop, the pass's held-out pairs counted in its time, not in its FLOPs)
    for v in ("anneal", "trl"):
        flops = 8 * n_params * med[v]["tokens"]
        out[f"{v}_train_gflops"] = round(flops / med[v]["train_s"] / 1e9, 1)
        out[f"{v}_peak_fraction"] = round(flops / med[v]["train_s"] / 1e9 / peak, 3)
        out[f"{v}_tokens_per_s"] = round(med[v]["tokens"] / med[v]["train_s"], 1)
    # ratios: the median over repetitions of each repetition's ratio (the variants of one repetition ran back to
    # back, so they share the machine's state of the moment)
    wall = {v: [r["wall_s"] for r in rs] for v, rs in runs.items()}
    paired = lambda f: round(statistics.median(f(i) for i in range(len(wall["trl"]))), 3)
    out["time_ratio"] = paired(lambda i: wall["anneal"][i] / wall["trl"][i])
    out["rss_ratio"] = round(med["anneal"]["peak_rss_mb"] / med["trl"]["peak_rss_mb"], 3)
    out["tokens_per_s_ratio"] = round(out["anneal_tokens_per_s"] / out["trl_tokens_per_s"], 3)
    # padding and real tokens per second (non-padding training tokens over the whole anneal's wall time)
    rate = lambda v, i: runs[v][i]["tokens"] / runs[v][i]["wall_s"]
    for v, rs in runs.items():
        if rs[0]["tokens"] is None:
            continue
        # training forwards: the real training tokens against the positions computed with gradients; the reference:
        # the stage's pass over every pair against its no-grad forwards (plain TRL's reference scores the training
        # batches themselves); real training tokens as TRL counts them (num_tokens)
        total = lambda kind, key, rs=rs: sum(r["positions"][kind][key] for r in rs)
        trained = sum(r["tokens"] for r in rs)
        out.setdefault("padding_share", {})[v] = {
            "train": round(1 - trained / total("computed", "grad"), 3),
            "reference": round(1 - (total("real", "reference") or trained) / total("computed", "no_grad"), 3),
        }
        out.setdefault("real_tokens_per_s", {})[v] = round(statistics.median(rate(v, i) for i in range(len(rs))), 1)
    if runs["anneal"][0].get("heldout_correct") is not None:
        from pipeline import metrics  # paired over the same check pairs: each variant against the stage's default

        correct = {v: rs[0]["heldout_correct"] for v, rs in runs.items()}
        out["heldout_preference_accuracy"] = {v: round(sum(c) / len(c), 3) for v, c in correct.items()}
        out["heldout_vs_anneal"] = {
            v: metrics.paired_bootstrap(correct[v], correct["anneal"], 1000, 0) for v in correct if v != "anneal"
        }
    if "padding_share" in out:
        reps = range(len(wall["trl"]))
        for v in [v for v in runs if v.startswith("anneal-") or v == "anneal"]:
            paired_reps = range(min(len(runs[v]), len(runs["trl"])))
            ratios = [rate(v, i) / rate("trl", i) for i in paired_reps]
            loops = [runs["trl"][i]["loop_s"] / runs[v][i]["loop_s"] for i in paired_reps]
            out.setdefault("real_tokens_per_s_ratio", {})[v] = round(statistics.median(ratios), 3)
            out.setdefault("real_tokens_per_s_ratio_range", {})[v] = [round(min(ratios), 3), round(max(ratios), 3)]
            out.setdefault("training_loop_speedup", {})[v] = round(statistics.median(loops), 3)
            out.setdefault("training_loop_speedup_range", {})[v] = [round(min(loops), 3), round(max(loops), 3)]
            if "anneal-padded" in runs:
                out.setdefault("rss_ratio_vs_padded", {})[v] = round(
                    med[v]["peak_rss_mb"] / med["anneal-padded"]["peak_rss_mb"], 3
                )
        out["repetitions"] = {v: len(rs) for v, rs in runs.items()} | {"paired_with_trl": len(reps)}
    if "sweep4" in wall:
        sweeps = range(len(wall["sweep4"]))
        out["sweep4_ratio"] = round(statistics.median(wall["sweep4"][i] / (4 * wall["anneal"][i]) for i in sweeps), 3)
    if "anneal-lora" in med:
        out["lora_rss_ratio"] = round(med["anneal-lora"]["peak_rss_mb"] / med["trl-lora"]["peak_rss_mb"], 3)
        out["lora_time_ratio"] = paired(lambda i: wall["anneal-lora"][i] / wall["trl-lora"][i])
    print(f"\n== {size}: {out['params_m']}M parameters, bf16 autocast {bf16} ==")
    print(
        "train s: training with the reference's work in it (plain TRL: its loop, the reference forward inside; "
        "the stage: its reference pass + its loop); tokens/s: training tokens over train s"
    )
    print(f"{'variant':14s}{'wall s':>9s}{'train s':>9s}{'tokens/s':>10s}{'peak RSS MB':>13s}")
    for v, m in med.items():
        train, speed = (
            (f"{m['train_s']:9.2f}", f"{m['tokens'] / m['train_s']:10.0f}")
            if m["train_s"] is not None
            else (f"{'-':>9s}", f"{'-':>10s}")
        )
        print(f"{v:14s}{m['wall_s']:9.2f}{train}{speed}{m['peak_rss_mb']:13.0f}")
    print(
        f"time_ratio (anneal / plain TRL, wall) {out['time_ratio']}   rss_ratio {out['rss_ratio']}   "
        f"training tokens/s ratio (reference pass included) {out['tokens_per_s_ratio']}   "
        f"4-point sweep / 4 independent {out.get('sweep4_ratio', 'not measured')}"
    )
    if "padding_share" in out:
        print("padding share of the computed positions (training forwards; reference forwards), real tokens/s:")
        for v, share in out["padding_share"].items():
            print(
                f"  {v:14s} training {share['train']:.1%}   reference {share['reference']:.1%}   "
                f"real tokens/s {out['real_tokens_per_s'][v]}"
            )
    if "real_tokens_per_s_ratio" in out:
        span = lambda key, v: "{:.2f}-{:.2f}".format(*out[key + "_range"][v])
        print(f"against plain TRL, paired per repetition (median, min-max over {out['repetitions']}):")
        for v, ratio in out["real_tokens_per_s_ratio"].items():
            print(
                f"  {v:14s} whole stage real tokens/s {ratio:.2f}x ({span('real_tokens_per_s_ratio', v)})   training "
                f"loop alone {out['training_loop_speedup'][v]:.2f}x ({span('training_loop_speedup', v)})"
            )
        if "rss_ratio_vs_padded" in out:
            print(f"peak RSS, ratio to the stage without packing: {out['rss_ratio_vs_padded']}")
    if "heldout_vs_anneal" in out:
        print(
            f"held-out preference accuracy on {len(runs['anneal'][0]['heldout_correct'])} check pairs "
            f"{out['heldout_preference_accuracy']}; minus the stage's (anneal), paired [95%]: "
            + "; ".join(
                f"{v} {d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                for v, d in out["heldout_vs_anneal"].items()
            )
        )
    if "lora_rss_ratio" in out:
        print(f"LoRA: rss_ratio {out['lora_rss_ratio']}   time_ratio {out['lora_time_ratio']}")
    print(
        f"achieved training throughput (8 FLOP per parameter per training token: policy forward + backward and "
        f"reference forward, over train s): anneal {out['anneal_train_gflops']} GFLOP/s "
        f"({out['anneal_peak_fraction']:.0%} of the {peak:.0f} GFLOP/s matmul peak), plain TRL "
        f"{out['trl_train_gflops']} GFLOP/s ({out['trl_peak_fraction']:.0%})"
    )
    return out


if __name__ == "__main__":
    main()
