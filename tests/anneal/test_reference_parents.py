"""A DPO reference built from all the merge's parents (`anneal.reference=parents`): each combination checked row
by row against parent log-probs computed directly with transformers, each parent's pass cached on its own, and the
bad settings refused before any model is loaded."""

import json

import numpy as np
import pytest
import torch
from datasets import load_dataset
from test_anneal import completion_logps
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from pipeline import UserError, manifest
from pipeline.app import run_pipeline
from stages.anneal.reference_pass import combine_logps


def test_combinations_on_numbers():
    chosen = np.array([[-1.0, -5.0, -2.0], [-3.0, -1.0, -2.0]])  # 2 parents, 3 pairs
    rejected = np.array([[-4.0, -6.0, -7.0], [-2.0, -9.0, -3.0]])
    c, r, who = combine_logps(chosen, rejected, "mean")
    assert np.allclose(c, np.log(np.exp(chosen).mean(0))) and np.allclose(r, np.log(np.exp(rejected).mean(0)))
    assert list(who) == [-1, -1, -1]
    c, r, who = combine_logps(chosen, rejected, "max")
    assert list(who) == [0, 1, 0] and list(c) == [-1.0, -1.0, -2.0] and list(r) == [-4.0, -9.0, -7.0]
    c, r, who = combine_logps(chosen, rejected, "route", route=[1, 1, 0])
    assert list(c) == [-3.0, -1.0, -2.0] and list(r) == [-2.0, -9.0, -7.0]


@pytest.fixture(scope="module")
def routed_data(tiny, tmp_path_factory):
    """The tiny pairs with a `skill` column naming the parent whose skill each pair is (as the demo's data has)."""
    folder = tmp_path_factory.mktemp("routed")
    for split in ("train", "heldout"):
        rows = [json.loads(line) for line in (tiny.root / "data" / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(
            folder / f"{split}.jsonl", [{**r, "skill": "add" if "+" in r["prompt"] else "reverse"} for r in rows]
        )
    return ["data=custom", f"data.path={folder / 'train.jsonl'}", f"data.heldout.path={folder / 'heldout.jsonl'}"]


def test_each_combination_row_by_row_and_each_parent_cached_once(make_short_cfg, routed_data, tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny["add"])
    direct = {}
    for n, how in enumerate(("mean", "max", "route")):
        run_dir = tmp_path / how
        every_stage = ["pipeline.stages=[merge,anneal,eval,release]", *tiny.data[3:]] if how == "mean" else []
        cfg = make_short_cfg(
            "+merge=slerp", "anneal.reference=parents", f"anneal.reference_combine={how}", *routed_data, *every_stage
        )
        run_pipeline(cfg, run_dir)
        entry = manifest.load(run_dir)["stages"]["anneal"]
        if every_stage:  # eval and the model card say which parents and which combination
            report = json.loads((run_dir / "eval" / "metrics.json").read_text())["reference"]
            assert report["anneal"] == "parents:mean" and report["parents"] == ["add", "reverse"]
            assert report["kl_to"].startswith("parent:add")
            retention = json.loads((run_dir / "eval" / "metrics.json").read_text())["models"]["annealed"]["retention"]
            # random parents score 0 on the demo's tasks, at chance: no retention to report
            assert retention and set(retention.values()) == {None}
            card = next((run_dir / "release").glob("*/README.md")).read_text()
            assert "`add + reverse (log-probs combined by mean)`" in card
        assert entry["inputs"]["reference_label"] == f"parents:{how}"
        assert list(entry["inputs"]["references"]) == ["add", "reverse"]
        # each parent's pass is cached on its own: computed by the first run, reused by the next
        assert entry["cache"]["reference_logps_by_parent"] == {
            "add": "hit" if n else "miss",
            "reverse": "hit" if n else "miss",
        }
        store = load_dataset("parquet", data_files=entry["outputs"]["reference_logps"], split="train")
        rows = store.select(range(0, len(store), 5))
        if not direct:  # the parents' log-probs, computed directly with transformers (no TRL)
            for name in ("add", "reverse"):
                model = AutoModelForCausalLM.from_pretrained(tiny[name], dtype=torch.float32).eval()
                direct[name] = [
                    completion_logps(model, tokenizer, rows["prompt"], rows[c]).double().numpy()
                    for c in ("chosen", "rejected")
                ]
        for name in ("add", "reverse"):
            for i, column in enumerate(("ref_chosen_logps", "ref_rejected_logps")):
                assert np.allclose(rows[f"{column}:{name}"], direct[name][i], atol=1e-3)
        stacked = [np.stack([direct["add"][i], direct["reverse"][i]]) for i in (0, 1)]
        skills = ["add" if "+" in prompt else "reverse" for prompt in rows["prompt"]]  # what the skill column says
        route = [0 if s == "add" else 1 for s in skills] if how == "route" else None
        expected_chosen, expected_rejected, speaker = combine_logps(*stacked, how, route)
        if how == "mean":  # independently of combine_logps: the log of the mean probability
            expected_chosen = np.log(np.exp(stacked[0]).mean(0))
        assert np.allclose(rows["ref_chosen_logps"], expected_chosen, atol=1e-3)
        assert np.allclose(rows["ref_rejected_logps"], expected_rejected, atol=1e-3)
        if how == "route":
            assert rows["ref_parent"] == skills
        elif how == "max":
            assert set(rows["ref_parent"]) <= {"add", "reverse"}
            assert all(
                rows[f"ref_chosen_logps:{p}"][i]
                == max(rows["ref_chosen_logps:add"][i], rows["ref_chosen_logps:reverse"][i])
                for i, p in enumerate(rows["ref_parent"])
            )


@pytest.mark.parametrize(
    "overrides, phrases",
    [
        (["anneal.reference_combine=median"], ["median", "mean", "max", "route"]),
        (["anneal.reference_combine=route", "anneal.reference_route=domain"], ["'domain'", "do not have"]),
        (["anneal.reference_combine=route", "anneal.reference_route=prompt"], ["names", "not parents"]),
    ],
)
def test_bad_parents_reference_settings_are_refused_before_loading(overrides, phrases, make_short_cfg, tmp_path):
    run_pipeline(make_short_cfg("+merge=slerp", "pipeline.stages=[merge]"), tmp_path)
    with pytest.raises(UserError) as err:
        run_pipeline(
            make_short_cfg("+merge=slerp", "anneal.reference=parents", *overrides, "pipeline.stages=[anneal]"), tmp_path
        )
    message = " ".join(str(err.value).split())
    for phrase in phrases:
        assert phrase in message, message
    assert not (tmp_path / "anneal" / "reference_logps_by_parent").exists()


def test_parents_needs_two_parents():
    from stages.anneal.references import check_parents_reference

    with pytest.raises(UserError, match="at least two parents"):
        check_parents_reference(["/models/add"])
    assert list(check_parents_reference(["/m/a", "/m/b"])) == ["a", "b"]
