"""Faults: damaged checkpoints are named with the fix before any library reads them; a training run that diverges
stops at that step with nothing saved; the cache checks itself and never shares a writable file with a run; a full
disk stops a stage with a message and keeps nothing. The kill-and-resume suite is
tests/shared/test_fault_injection.py."""

import json
import os
import shutil

import pytest

from pipeline import manifest


def damaged_copy(tiny, tmp_path, damage) -> list[str]:
    """The tiny parents copied (never the shared ones), `damage(add_folder)` applied to the copy of `add`."""
    for name in ("base", "add", "reverse"):
        shutil.copytree(tiny[name], tmp_path / "parents" / name)
    damage(tmp_path / "parents" / "add")
    root = tmp_path / "parents"
    return ["models=local", f"models.base={root / 'base'}", f"models.parents=[{root / 'add'},{root / 'reverse'}]"]


def truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def bad_header(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json at "
    weights.write_bytes(bytes(data))


def bad_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama", ')


def missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {
        "lm_head.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (truncate, "truncated or corrupt"),
        (bad_header, "header does not parse"),
        (bad_config, "does not parse as JSON"),
        (missing_shard, "model-00002-of-00002.safetensors"),
    ],
)
def test_a_damaged_parent_is_named_with_the_fix(damage, phrase, cli, tiny, tmp_path):
    models = damaged_copy(tiny, tmp_path, damage)
    result, run_dir = cli("+merge=slerp", *models, *tiny.data, "pipeline.stages=[merge]")
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split("merge-anneal: error:")[-1].split())
    assert phrase in message and "add" in message and "again" in message and "Traceback" not in result.stderr
    stages = manifest.load(run_dir)["stages"] if (run_dir / "manifest.json").exists() else {}
    assert stages.get("merge", {}).get("status") != "done" and not (run_dir / "merge" / "model").exists()


def test_a_diverging_anneal_stops_at_that_step_and_saves_nothing(cli, tiny):
    result, run_dir = cli(
        "+merge=slerp",
        *tiny.overrides,
        "anneal.trainer.learning_rate=1e12",
        "anneal.trainer.max_steps=8",
        "pipeline.cache=false",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split("merge-anneal: error:")[-1].split())
    assert "Training diverged" in message and "at step" in message and "anneal.trainer.learning_rate" in message
    stages = manifest.load(run_dir)["stages"]
    assert stages["anneal"]["status"] == "failed" and "eval" not in stages
    assert not (run_dir / "anneal" / "model").exists()


def test_a_malformed_preference_line_is_named(cli, tiny, tmp_path):
    lines = (tiny.root / "data" / "train.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-5]  # a line cut short, as by an interrupted write
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    result, run_dir = cli(
        "+merge=slerp",
        *tiny.models,
        "data=custom",
        f"data.path={tmp_path / 'prefs.jsonl'}",
        "data.heldout.fraction=0.2",
        "pipeline.stages=[merge,anneal]",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split("merge-anneal: error:")[-1].split())
    assert "line 7 is not a JSON object" in message and "prefs.jsonl" in message and "Traceback" not in message
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "merge").exists()  # before the merge


def test_resume_skips_a_checkpoint_cut_short_while_saving(tmp_path):
    """A kill while the Trainer saves leaves a checkpoint folder without its trainer_state.json (written last):
    resuming takes the complete one before it."""
    from stages.anneal import training

    assert training.last_checkpoint(str(tmp_path / "none")) is None
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text('{"global_step": 2')  # torn write
    (tmp_path / "checkpoint-30" / "model.safetensors").write_bytes(b"partial")
    assert training.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-30" / "trainer_state.json").write_text('{"global_step": 30}')
    assert training.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-30")


# ------------------------------------------------------------------------------------- a self-checking cache


def build_counter(calls):
    """A cache `build` that writes two files (one nested) and counts its calls."""

    def build(entry):
        from pipeline.artifacts import publish

        calls.append(entry)

        def fill(tmp):
            (tmp / "sub").mkdir(parents=True)
            (tmp / "weights.bin").write_bytes(bytes(range(256)) * 64)
            (tmp / "sub" / "config.json").write_text('{"a": 1}')

        publish(entry, fill)

    return build


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_runs_get_their_own_copies_and_a_damaged_entry_is_set_aside_and_rebuilt(tmp_path, caplog):
    from pipeline.artifacts import SEAL, entry_problem, through_cache

    calls, entry = [], tmp_path / "cache" / "merges" / "k"
    assert through_cache(entry, build_counter(calls), tmp_path / "run1") == "miss"
    assert through_cache(entry, build_counter(calls), tmp_path / "run2") == "hit" and len(calls) == 1
    sealed = json.loads((entry / SEAL).read_text())["files"]
    assert set(sealed) == {"weights.bin", "sub/config.json"} and sealed["weights.bin"]["size"] == 16384
    good = tree(tmp_path / "run2")
    assert SEAL not in good and good == tree(tmp_path / "run1")

    # a write into one run's files (in place, same size) changes neither the cache nor the other run: as root the
    # run has a copy (no reflinks on ext4); otherwise a read-only hard link refuses the write
    try:
        with open(tmp_path / "run1" / "weights.bin", "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 20)
    except PermissionError:
        assert os.geteuid() != 0
    assert entry_problem(entry) is None and tree(tmp_path / "run2") == good
    assert through_cache(entry, build_counter(calls), tmp_path / "run3") == "hit" and tree(tmp_path / "run3") == good

    # damage in the cache itself, each kind: set aside with one warning, rebuilt, the right result
    def flip(e):
        data = bytearray((e / "weights.bin").read_bytes())
        data[5000:5020] = b"\x00" * 20
        (e / "weights.bin").write_bytes(bytes(data))

    damages = {
        "sha256 differs": flip,
        "bytes, 16384": lambda e: (e / "weights.bin").write_bytes(b"short"),
        "is missing": lambda e: (e / "sub" / "config.json").unlink(),
        "has no seal": lambda e: (e / SEAL).unlink(),
        "added after": lambda e: (e / "extra.txt").write_text("x"),
    }
    for n, (phrase, damage) in enumerate(damages.items()):
        damage(entry)
        caplog.clear()
        assert through_cache(entry, build_counter(calls), tmp_path / f"again{n}") == "miss", phrase
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and phrase in warnings[0] and "computing it again" in warnings[0], warnings
        assert tree(tmp_path / f"again{n}") == good and entry_problem(entry) is None
    assert len(calls) == 1 + len(damages) and len(list((entry.parent / ".bad").iterdir())) == len(damages)


def test_hardlinked_runs_are_read_only_and_a_killed_builders_partial_is_cleaned(tmp_path):
    from pipeline.artifacts import through_cache

    calls, entry = [], tmp_path / "cache" / "k"
    stale = entry.with_name(f".{entry.name}.partial-999-1")  # what a killed writer leaves
    stale.mkdir(parents=True)
    through_cache(entry, build_counter(calls), tmp_path / "run", files="hardlink")
    assert not stale.exists()
    linked = tmp_path / "run" / "weights.bin"
    assert linked.stat().st_nlink == 2 and not os.stat(linked).st_mode & 0o222


def test_a_damaged_cached_merge_is_merged_again_with_one_warning(cli, tiny, tmp_path, cache_dir):
    """The issue's case, on a real merge: 20 bytes of a cached file overwritten. The next run that needs it warns
    once, merges again and gets the same bytes; no traceback."""
    first, run1 = cli("+merge=slerp", *tiny.models, *tiny.data, "pipeline.stages=[merge]")
    assert first.returncode == 0, first.stderr[-2000:]
    entry = next(p for p in (cache_dir / "merges").iterdir() if p.is_dir() and not p.name.startswith("."))
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 20] = b"\x13" * 20
    weights.write_bytes(bytes(data))
    second, run2 = cli("+merge=slerp", *tiny.models, *tiny.data, "pipeline.stages=[merge]", run_dir=tmp_path / "run2")
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr[-2000:]
    logged = (run2 / "merge-anneal.log").read_text()
    assert second.stdout.count("failed its check") == logged.count("failed its check") == 1, second.stdout
    assert "model.safetensors has changed" in logged
    assert manifest.load(run2)["stages"]["merge"]["cache"]["merge"] == "miss"
    from pipeline.artifacts import SEAL

    cached = tree(entry)
    assert cached.pop(SEAL) and tree(run2 / "merge" / "model") == tree(run1 / "merge" / "model") == cached


def test_a_full_disk_while_merging_stops_with_a_message_and_keeps_nothing(tiny, tmp_path):
    """A real full disk: the run folder and the cache on a 64 KiB tmpfs (a private mount namespace, so no root on
    the host is needed), too small for the merged weights."""
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("needs unshare with user and mount namespaces to mount a small file system")
    small, out = tmp_path / "small", tmp_path / "out"
    small.mkdir()
    out.mkdir()
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "+merge=slerp",
        *tiny.models,
        *tiny.data,
        "pipeline.stages=[merge]",
        f"hydra.run.dir={small / 'run'}",
        f"pipeline.cache_dir={small / 'cache'}",
    ]
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {small} && cd {tmp_path} && {' '.join(map(repr, command))}; "
        f"echo $? > {out / 'rc'}; cp -a {small}/run {small}/cache {out}/"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (out / "rc").read_text().strip() == "2", result.stderr[-3000:]
    message = " ".join(result.stderr.split("merge-anneal: error:")[-1].split())
    assert "the disk filled up" in message and "No space left on device" in message, result.stderr[-3000:]
    assert "pipeline.resume=true" in message and "Traceback" not in result.stderr
    assert manifest.load(out / "run")["stages"]["merge"]["status"] == "failed"
    assert not (out / "run" / "merge" / "model").exists()
    assert not [p for p in (out / "cache" / "merges").iterdir() if not p.name.endswith(".lock")]  # no entry, no partial
