"""Benchmark: what the checks of a merge cost, beside the work they guard, in one run.

    python bench/merge_check.py                       # the 94.5M Llama of bench/anneal_vs_trl.py (size 100m)
    python bench/merge_check.py --size 10m --repeats 3

Parents and pairs: bench/anneal_vs_trl.py's (a random Llama base and two children, base + seeded noise; synthetic
pairs of 100 + 30 characters, 64 of them held out). In this one process, per repetition:

  merge   the merge stage (linear, float32, cache off), the whole-merge check included;
  whole   `merge_check.check_merged` alone on that merge (what each merge the stage writes pays), in its two
          parts: `report`, `check_architecture` (transformers' loading report on the meta device, the tokenizer),
          and `finite`, `check_finite` (every tensor read back for finiteness, as the stage did before the check);
  gate    `stages.anneal.gate.perplexity_gate`: the merged model and both parents score the 64 held-out chosen
          answers (what each anneal pays before its reference pass; loading the held-out pairs is not timed);
  anneal  the anneal stage with the gate off (`--steps` steps of 8 pairs, reference pass included, cache off).

Printed: medians, whole / merge, gate / anneal, and the gate in training steps (the anneal's train phase seconds
per step: loading, reference pass and saving left out).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BATCH, HELDOUT = 8, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="100m", help="a size of bench/anneal_vs_trl.py: 1m, 10m, 100m")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from anneal_vs_trl import SIZES, make_parents, synthetic_pairs
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline import CONF_DIR, preferences, records
    from pipeline.app import run_pipeline
    from pipeline.settings import DataSettings
    from stages import anneal
    from stages.anneal import gate
    from stages.anneal.settings import MergeCheck
    from stages.merge import integrity as merge_check

    work = Path(tempfile.mkdtemp(prefix="merge-check-bench-"))
    dims = SIZES[args.size]
    base, parents = make_parents(work / "parents", dims)
    rows = synthetic_pairs(args.steps * BATCH + HELDOUT, dims["prompt_chars"], dims["completion_chars"])
    for name, part in (("train", rows[:-HELDOUT]), ("heldout", rows[-HELDOUT:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    overrides = [
        "+merge=linear",
        "models=local",
        f"models.base={base}",
        f"models.parents=[{parents[0]},{parents[1]}]",
        "data=custom",
        f"data.path={work / 'train.jsonl'}",
        f"data.heldout.path={work / 'heldout.jsonl'}",
        f"pipeline.cache_dir={work / 'cache'}",
        "pipeline.cache=false",
        "anneal.reference=0",
        f"anneal.trainer.max_steps={args.steps}",
        f"anneal.trainer.per_device_train_batch_size={BATCH}",
        f"anneal.trainer.max_length={dims['prompt_chars'] + dims['completion_chars'] + 4}",
        "anneal.trainer.save_strategy=no",
        "anneal.trainer.disable_tqdm=true",
        "eval.batch_size=8",
        "anneal.trainer.activation_checkpointing=false",
        "pipeline.merge_check.texts=0",  # the gate: timed alone
    ]

    def config(*more):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[*overrides, *more])

    seconds = {"merge": [], "whole": [], "report": [], "finite": [], "gate": [], "anneal": [], "train": []}
    for rep in range(args.repeats):
        run_dir = work / f"run{rep}"
        started = time.perf_counter()
        run_pipeline(config("pipeline.stages=[merge]"), run_dir)
        seconds["merge"].append(time.perf_counter() - started)
        merge = records.load(run_dir, records.MergeRecord)
        started = time.perf_counter()
        merge_check.check_merged(Path(merge.outputs.model))
        seconds["whole"].append(time.perf_counter() - started)
        for part, check in (("report", merge_check.check_architecture), ("finite", merge_check.check_finite)):
            started = time.perf_counter()
            check(Path(merge.outputs.model))
            seconds[part].append(time.perf_counter() - started)
        cfg = config()
        heldout = preferences.load_preferences(DataSettings.of(cfg.data, "data"))[0]["heldout"]  # the stage's own
        started = time.perf_counter()
        checked = gate.perplexity_gate(
            MergeCheck(texts=HELDOUT, max_perplexity_ratio=10),
            heldout,
            merge,
            OmegaConf.to_container(cfg.anneal.trainer),
            int(cfg.eval.batch_size),
        )
        seconds["gate"].append(time.perf_counter() - started)
        started = time.perf_counter()
        record = anneal.run(config("pipeline.stages=[anneal]"), run_dir)
        seconds["anneal"].append(time.perf_counter() - started)
        seconds["train"].append(record.seconds_by_phase["train"])
        print(
            f"rep {rep}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items())
            + f"; gate ratio {checked['ratio']:.3f}",
            flush=True,
        )

    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"\n{args.size} Llama, {args.repeats} repetitions, medians:")
    print(
        f"  merge stage {median['merge']:.2f} s, of it the whole-merge check {median['whole']:.2f} s "
        f"({median['whole'] / median['merge']:.3f}x): loading report and tokenizer {median['report']:.3f} s, "
        f"finiteness {median['finite']:.3f} s"
    )
    step = median["train"] / args.steps
    print(
        f"  anneal stage ({args.steps} steps of {BATCH} pairs) {median['anneal']:.2f} s, of it training "
        f"{median['train']:.2f} s ({step:.2f} s a step); the perplexity gate ({HELDOUT} answers, merged + 2 "
        f"parents) {median['gate']:.2f} s ({median['gate'] / median['anneal']:.3f}x the stage, "
        f"{median['gate'] / step:.1f} training steps)"
    )


if __name__ == "__main__":
    main()
