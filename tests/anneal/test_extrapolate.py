"""anneal.extrapolate (stages/anneal/extrapolate.py): merged + alpha x (annealed - merged) built by mergekit, alpha
chosen on validation pairs carved from the training pairs, alpha 1.0 the annealed model bit for bit."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from pipeline import manifest, preferences
from stages.anneal import extrapolate


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_choice_is_the_best_score_and_a_tie_goes_to_the_alpha_nearest_one():
    assert extrapolate.candidates([1.5, 1.25]) == [1.0, 1.25, 1.5]  # the annealed model is always a candidate
    assert extrapolate.choose({1.0: 0.7, 1.25: 0.8, 1.5: 0.75}) == 1.25
    assert extrapolate.choose({1.0: 0.8, 1.25: 0.8, 1.5: 0.8}) == 1.0
    assert extrapolate.choose({0.5: 0.6, 1.5: 0.6, 2.0: 0.5}) == 0.5  # equally near 1: the smaller


def test_alpha_one_keeps_the_annealed_model_bit_for_bit_and_others_are_mergekits_arithmetic(tiny, tmp_path):
    merged, annealed = tiny["base"], tmp_path / "anneal" / "model"
    annealed.parent.mkdir()
    shutil.copytree(tiny["add"], annealed)
    before = digests(annealed)
    rows = [json.loads(line) for line in (tiny.root / "data" / "heldout.jsonl").read_text().splitlines()]
    validation = Dataset.from_list(rows[:8])
    record = extrapolate.extrapolate([1.0], merged, annealed, validation, annealed.parent, {"max_length": 64}, 8)
    assert record["chosen"] == 1.0 and list(record["alphas"]) == ["1"] and record["validation_pairs"] == 8
    assert digests(annealed) == before and not (annealed.parent / "model-alpha-1").exists()
    expected = extrapolate.validation_accuracy(annealed, validation, 64, "keep_start", 8)
    assert record["alphas"]["1"] == expected  # the score is the validation pairs' preference accuracy

    built = extrapolate.build(merged, annealed, 2.0, tmp_path / "alpha-2")
    base, tuned, pushed = (load_file(p / "model.safetensors") for p in (merged, annealed, built))
    for name, value in pushed.items():  # merged + 2 x (annealed - merged), computed in float32
        torch.testing.assert_close(value, base[name] + 2.0 * (tuned[name] - base[name]), rtol=1e-5, atol=1e-6)
    assert (built / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("alphas", ["[1.0,1.5]"])
def test_the_stage_carves_validation_from_training_and_eval_reports_the_alpha(cli, tiny, tmp_path, alphas):
    result, run_dir = cli(
        "+merge=slerp",
        *tiny.overrides,
        "eval/benchmarks=none",
        f"anneal.extrapolate={alphas}",
        "anneal.extrapolate_validation=0.25",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    anneal = manifest.load(run_dir)["stages"]["anneal"]
    chosen = anneal["extrapolation"]
    assert set(chosen["alphas"]) == {"1", "1.5"} and chosen["chosen"] in (1.0, 1.5)
    assert (run_dir / "anneal" / "model-alpha-1").is_dir() == (chosen["chosen"] != 1.0)
    train = [json.loads(line) for line in (tiny.root / "data" / "train.jsonl").read_text().splitlines()]
    seed = anneal["config"]["anneal"]["trainer"].get("seed", 42)  # the split's seed: training's
    kept, validation = preferences.split_by_prompt(Dataset.from_list(train), 0.25, seed=seed)
    assert anneal["data"]["train_pairs"] == len(kept) and chosen["validation_pairs"] == len(validation) > 0
    assert not {preferences.prompt_key(p) for p in validation["prompt"]} & {
        preferences.prompt_key(p) for p in kept["prompt"]
    }
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["extrapolation"] == chosen
    assert "extrapolated, merged +" in (run_dir / "eval" / "report.md").read_text()
