"""Fault injection (`pytest -m faults`, about 10 minutes on 2 cores; not in plain `pytest`): `python -m pipeline`
killed with SIGKILL at each stage boundary and at seeded random points inside the merge, the reference pass,
training, eval and release (5 boundaries, 20 seeded points), then resumed with `pipeline.resume=true`. Every run
must end `done` with the same outputs as an uninterrupted run (the merge byte for byte, the annealed and released
weights tensor for tensor, the eval metrics), no cache entry may be left half-written and no temporary may
outlive the resume. A point is tested where it says: a kill that misses its phase is tried again, sooner. Two
processes sharing a cache compute a merge once. Each point appends a line of figures to `<pytest session
folder>/fault-injection.jsonl`; `python tests/shared/fault_table.py FILE` tabulates them."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ONE_THREAD, TEST_CACHE, session_root
from pipeline import manifest
from pipeline.artifacts import entry_problem

pytestmark = pytest.mark.faults

# Eight steps with a checkpoint every two, so kills inside training resume from a checkpoint.
TRAIN = [
    "anneal.trainer.max_steps=8",
    "anneal.trainer.save_steps=2",
    "anneal.trainer.logging_steps=2",
    "anneal.trainer.per_device_train_batch_size=4",
    "anneal.trainer.max_length=64",
    "anneal.trainer.disable_tqdm=true",
]


def status(run_dir: Path, stage: str) -> str | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"].get(stage, {}).get("status")
    except (OSError, ValueError):
        return None


# When each phase starts and ends, as seen from outside the process (the manifest, and the reference pass's files).
STARTS = {
    "merge": lambda r: status(r, "merge") == "running",
    "reference": lambda r: (r / "anneal" / ".reference-pass").exists(),
    "training": lambda r: (r / "anneal" / "reference_logps").exists(),
    "eval": lambda r: status(r, "eval") == "running",
    "release": lambda r: status(r, "release") == "running",
}
ENDS = {
    "merge": lambda r: status(r, "merge") == "done",
    "reference": STARTS["training"],
    "training": lambda r: status(r, "anneal") == "done",
    "eval": lambda r: status(r, "eval") == "done",
    "release": lambda r: status(r, "release") == "done",
}
BOUNDARIES = {
    "start": lambda r: (r / "manifest.json").exists(),
    "merge|anneal": ENDS["merge"],
    "anneal|eval": ENDS["training"],
    "eval|release": ENDS["eval"],
    "end": ENDS["release"],
}
FRACTIONS = random.Random(13).choices([x / 1000 for x in range(50, 700)], k=20)  # of the phase's uninterrupted time
SEEDED = [(phase, fraction) for phase, fraction in zip([p for p in STARTS for _ in range(4)], FRACTIONS)]
POINTS = [(f"boundary {b}", b, 0.0) for b in BOUNDARIES] + [(f"{p} at {f:.0%}", p, f) for p, f in SEEDED]


def command(tiny, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "+merge=slerp",
        *tiny.models,
        *tiny.data,
        *TRAIN,
        *extra,
        f"pipeline.cache_dir={work / 'cache'}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.run.dir={work / 'run'}",
    ]


def watch(args: list[str], work: Path, run_dir: Path, trigger=None, delay: float = 0.0, record=None) -> dict:
    """Run `args`, polling every 5 ms. With `trigger`: SIGKILL `delay` seconds after it first holds. With `record`
    (name -> predicate): the first time each holds. Returns rc, killed, seen (seconds from start)."""
    with open(work / "stdout.log", "ab") as out, open(work / "stderr.log", "ab") as err:
        proc = subprocess.Popen(args, cwd=work, stdout=out, stderr=err, env={**os.environ, **ONE_THREAD})
        start, fired, seen, killed = time.monotonic(), None, {}, False
        while proc.poll() is None:
            now = time.monotonic()
            for name, holds in (record or {}).items():
                if name not in seen and holds(run_dir):
                    seen[name] = now - start
            if trigger is not None and fired is None and trigger(run_dir):
                fired = now
            if fired is not None and now - fired >= delay:
                proc.kill()
                killed = True
                break
            time.sleep(0.005)
        rc = proc.wait(timeout=1800)
    return {"rc": rc, "killed": killed, "seen": seen}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    x, y = tensors(a), tensors(b)
    return bool(x) and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(run_dir: Path) -> dict:
    """eval/metrics.json without its timings."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "second" not in k and "time" not in k}
        return value

    return strip(json.loads((run_dir / "eval" / "metrics.json").read_text()))


def broken_entries(cache: Path) -> list[str]:
    """Visible cache entries that fail a full check: what a kill must never leave (it may leave temporaries, at
    hidden names, which the next run removes)."""
    return [
        f"{entry}: {problem}"
        for kind in ("merges", "reference_logps")
        if (cache / kind).is_dir()
        for entry in (cache / kind).iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
        if (problem := entry_problem(entry, "all"))
    ]


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


def kill_inside(tiny, work: Path, where: str, fraction: float, durations: dict) -> tuple[dict, str]:
    """Run and SIGKILL it at the point: a boundary as it is crossed, or `fraction` of the phase's uninterrupted
    duration after the phase starts. A kill that misses its phase (this run's phase was shorter) is tried again
    from scratch with half the delay, so the point is tested where it says; at delay 0 it lands as the phase
    starts. Returns the watch's result and where the kill landed."""
    trigger, delay = (BOUNDARIES[where], 0.0) if where in BOUNDARIES else (STARTS[where], fraction * durations[where])
    for _ in range(6):
        shutil.rmtree(work / "run", ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
        killed = watch(command(tiny, work), work, work / "run", trigger, delay)
        active = [p for p in STARTS if STARTS[p](work / "run") and not ENDS[p](work / "run")]
        landed = "boundary" if where in BOUNDARIES else active[-1] if active else "between or after stages"
        if (killed["killed"] or where == "end") and landed in ("boundary", where):
            break
        delay /= 2
    return killed, landed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny):
    """One run start to end, with the time each phase starts and ends."""
    work = tmp_path_factory.mktemp("uninterrupted")
    record = {**{f"{p} start": f for p, f in STARTS.items()}, **{f"{p} end": f for p, f in ENDS.items()}}
    result = watch(command(tiny, work), work, work / "run", record=record)
    assert result["rc"] == 0, (work / "stderr.log").read_text()[-3000:]
    seen = result["seen"]
    durations = {p: max(seen[f"{p} end"] - seen[f"{p} start"], 0.05) for p in STARTS}
    return work / "run", durations


@pytest.mark.parametrize("label, where, fraction", POINTS, ids=[p[0] for p in POINTS])
def test_killed_then_resumed_ends_done_with_the_same_outputs(
    label, where, fraction, uninterrupted, tiny, tmp_path, tmp_path_factory
):
    reference_run, durations = uninterrupted
    work, run_dir = tmp_path, tmp_path / "run"
    killed, landed = kill_inside(tiny, work, where, fraction, durations)
    at_kill = {s: status(run_dir, s) for s in ("merge", "anneal", "eval", "release")}
    half_written = broken_entries(work / "cache")  # before anything reads the cache again

    resumed = watch(command(tiny, work, "pipeline.resume=true"), work, run_dir)
    assert resumed["rc"] == 0, (work / "stderr.log").read_text()[-3000:]
    stages = manifest.load(run_dir)["stages"]
    checks = {
        # the point was tested where it says: killed before the run ended (the `end` boundary aside), inside its phase
        "killed_where_it_says": (killed["killed"] or where == "end") and landed in ("boundary", where),
        "done": all(stages[s]["status"] == "done" for s in ("merge", "anneal", "eval", "release")),
        "merge_bytes": files(run_dir / "merge" / "model") == files(reference_run / "merge" / "model"),
        "annealed": same_tensors(run_dir / "anneal" / "model", reference_run / "anneal" / "model"),
        "metrics": metrics(run_dir) == metrics(reference_run),
        "released": same_tensors(next((run_dir / "release").iterdir()), next((reference_run / "release").iterdir())),
        "no_half_written_cache": not half_written and not broken_entries(work / "cache"),
        "no_temporaries": not temporaries(run_dir) and not temporaries(work / "cache"),
    }
    figures = {
        "point": label,
        "landed": landed,
        "killed": killed["killed"],
        "at_kill": at_kill,
        "resumed_from": stages["anneal"].get("resumed_from"),
        **checks,
    }
    report = session_root(tmp_path_factory) / "fault-injection.jsonl"
    with open(report, "a") as f:
        f.write(json.dumps(figures) + "\n")
    print(f"fault injection figures: {report}")
    assert all(checks.values()), (figures, half_written)


def test_two_processes_sharing_a_cache_merge_once_and_both_finish(tiny, tmp_path):
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        args = [
            sys.executable,
            "-m",
            "pipeline",
            "+merge=slerp",
            *tiny.models,
            *tiny.data,
            "pipeline.stages=[merge]",
            f"pipeline.cache_dir={tmp_path / 'cache'}",
            f"models.cache_dir={TEST_CACHE}",
            f"hydra.run.dir={tmp_path / name / 'run'}",
        ]
        procs.append(
            subprocess.Popen(
                args, cwd=tmp_path / name, stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD}
            )
        )
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    states = sorted(manifest.load(tmp_path / n / "run")["stages"]["merge"]["cache"]["merge"] for n in ("a", "b"))
    entries = [e for e in (tmp_path / "cache" / "merges").iterdir() if not e.name.startswith(".")]
    assert states == ["hit", "miss"] and len(entries) == 1 and entry_problem(entries[0], "all") is None
    assert files(tmp_path / "a" / "run" / "merge" / "model") == files(tmp_path / "b" / "run" / "merge" / "model")
