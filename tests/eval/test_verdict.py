"""The verdict (stages/eval/verdict.py), the contamination audit (stages/eval/contamination.py) and the held-out
split by prompt (pipeline/preferences.py): pure functions on small hand-made inputs."""

import pytest

from pipeline import preferences
from pipeline.settings import DataSettings
from stages.eval import contamination, verdict


def kept(low, high, value=None):
    value = (low + high) / 2 if value is None else value
    return {"value": {"worst": value}, "ci95": {"worst": [low, high]}}


def versus(raw, controlled, raw_value=0.6, controlled_value=0.55):
    return {
        "vs": {
            "merged": {
                "n": 64,
                "win_rate": raw_value,
                "win_rate_ci95": raw,
                "length_controlled": controlled_value,
                "length_controlled_ci95": controlled,
            }
        }
    }


@pytest.mark.parametrize(
    "retention, capabilities",
    [
        (kept(0.96, 1.02), "kept"),
        (kept(0.80, 0.94), "lost"),
        (kept(0.90, 1.01), "inconclusive"),
        (None, "not_measured"),
    ],
)
def test_capabilities_by_the_worst_parents_interval(retention, capabilities):
    assert verdict.capabilities(retention, 0.95) == capabilities


@pytest.mark.parametrize(
    "wins, answers",
    [
        (versus([0.55, 0.7], [0.52, 0.6]), "better"),
        (versus([0.55, 0.7], [0.45, 0.6]), "longer_not_better"),
        (versus([0.3, 0.45], [0.3, 0.45]), "worse"),
        (versus([0.45, 0.56], [0.52, 0.6]), "no_difference"),
        (None, "not_measured"),
    ],
)
def test_answers_by_the_raw_and_length_controlled_intervals(wins, answers):
    assert verdict.answers((wins or {}).get("vs", {}).get("merged")) == answers


def test_one_sentence_with_the_numbers_and_ship_only_when_both_hold():
    out = verdict.decide(kept(0.96, 1.02, 0.99), versus([0.55, 0.7], [0.52, 0.6]), 0.95)
    assert out["ship"] and out["capabilities"] == "kept" and out["answers"] == "better"
    assert "0.99 [0.96, 1.02]" in out["sentence"] and "0.60 [0.55, 0.70]" in out["sentence"]
    assert "0.55 [0.52, 0.60]" in out["sentence"] and out["sentence"].endswith("Ship it.")
    longer = verdict.decide(kept(0.96, 1.02), versus([0.55, 0.7], [0.45, 0.6]), 0.95)
    assert not longer["ship"] and "only by being longer" in longer["sentence"]
    blind = verdict.decide(None, None, 0.95)
    assert not blind["ship"] and "not measured" in blind["sentence"] and "eval.win_rate.reward" in blind["sentence"]


def test_the_audit_counts_exact_and_13_gram_overlaps():
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    train = {"prompt": ["12+34=", "12+34=", long], "chosen": ["46", "46", "x"], "rejected": ["47", "45", "y"]}
    out = contamination.audit(
        train,
        {
            "heldout_pairs": ["56+78=", "12+34="],
            "benchmark_items": ["Q: " + long.upper(), "two three four"],
        },
    )
    assert out["exact"] == {"heldout_pairs": 1, "benchmark_items": 0}
    assert out["ngram13"] == {"heldout_pairs": 0, "benchmark_items": 1}  # lowercased whitespace tokens
    assert out["training_rows_repeating_a_prompt"] == 1 and out["flagged"]
    clean = contamination.audit(train, {"heldout_pairs": ["56+78="]})
    assert not clean["flagged"] and clean["items"] == {"heldout_pairs": 1}


def test_the_held_out_split_never_shares_a_prompt_with_training(tmp_path, make_cfg):
    from conftest import write_jsonl

    rows = [{"prompt": f"{i % 10}+1=", "chosen": str(i % 10 + 1), "rejected": str(i)} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", [r for r in rows if r["chosen"] != r["rejected"]])
    data = lambda *more: DataSettings.of(
        make_cfg("+merge=slerp", "data=custom", f"data.path={tmp_path / 'train.jsonl'}", *more).data, "data"
    )
    splits, _ = preferences.load_preferences(data("data.heldout.fraction=0.3"))
    train, heldout = set(splits["train"]["prompt"]), set(splits["heldout"]["prompt"])
    assert not train & heldout and len(heldout) == 3 and len(train) == 7  # 30 % of the 10 prompts, every pair
    write_jsonl(tmp_path / "heldout.jsonl", [rows[1], {"prompt": "new=", "chosen": "a", "rejected": "b"}])
    splits, dropped = preferences.load_preferences(data(f"data.heldout.path={tmp_path / 'heldout.jsonl'}"))
    assert splits["heldout"]["prompt"] == ["new="] and dropped["heldout"]["prompt_in_training"] == 1
