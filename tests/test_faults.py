"""Faults (issue 13, first part): damaged checkpoints are named with the fix before any library reads them, and a
training run that diverges stops at that step with nothing saved."""

import json
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
    weight_map = {"lm_head.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("damage, phrase", [
    (truncate, "truncated or corrupt"),
    (bad_header, "header does not parse"),
    (bad_config, "does not parse as JSON"),
    (missing_shard, "model-00002-of-00002.safetensors"),
])
def test_a_damaged_parent_is_named_with_the_fix(damage, phrase, cli, tiny, tmp_path):
    models = damaged_copy(tiny, tmp_path, damage)
    result, run_dir = cli("+merge=slerp", *models, *tiny.data, "pipeline.stages=[merge]")
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split("merge-anneal: error:")[-1].split())
    assert phrase in message and "add" in message and "again" in message and "Traceback" not in result.stderr
    stages = manifest.load(run_dir)["stages"] if (run_dir / "manifest.json").exists() else {}
    assert stages.get("merge", {}).get("status") != "done" and not (run_dir / "merge" / "model").exists()


def test_a_diverging_anneal_stops_at_that_step_and_saves_nothing(cli, tiny):
    result, run_dir = cli("+merge=slerp", *tiny.overrides, "anneal.trainer.learning_rate=1e12",
                          "anneal.trainer.max_steps=8", "pipeline.cache=false")
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
    result, run_dir = cli("+merge=slerp", *tiny.models, "data=custom", f"data.path={tmp_path / 'prefs.jsonl'}",
                          "data.heldout.fraction=0.2", "pipeline.stages=[merge,anneal]")
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split("merge-anneal: error:")[-1].split())
    assert "line 7 is not a JSON object" in message and "prefs.jsonl" in message and "Traceback" not in message
    assert manifest.load(run_dir)["stages"]["anneal"]["status"] == "failed"


def test_resume_skips_a_checkpoint_cut_short_while_saving(tmp_path):
    """A kill while the Trainer saves leaves a checkpoint folder without its trainer_state.json (written last):
    resuming takes the complete one before it."""
    from stages import anneal

    assert anneal.last_checkpoint(str(tmp_path / "none")) is None
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text('{"global_step": 2')  # torn write
    (tmp_path / "checkpoint-30" / "model.safetensors").write_bytes(b"partial")
    assert anneal.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-30" / "trainer_state.json").write_text('{"global_step": 30}')
    assert anneal.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-30")
