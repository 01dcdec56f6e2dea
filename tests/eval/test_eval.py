"""The eval stage: metric functions against hand-computed values, the bootstrap, and a real demo run."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import eval_report
from pipeline import manifest
from pipeline import metrics as M

LN3 = math.log(3)


# ------------------------------------------------------------------------------------------- metric functions


def test_token_and_sequence_logps():
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [LN3, 0.0]]])  # softmax: [1/4, 3/4], [1/2, 1/2], [3/4, 1/4]
    labels = torch.tensor([[1, 0, 1]])
    per_token = M.token_logps(logits, labels)
    torch.testing.assert_close(per_token, torch.log(torch.tensor([[0.75, 0.5, 0.25]])))
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # the first position is prompt
    torch.testing.assert_close(M.sequence_logps(per_token, mask), torch.tensor([math.log(0.5 * 0.25)]))
    torch.testing.assert_close(M.mean_logps(per_token, mask), torch.tensor([math.log(0.5 * 0.25) / 2]))
    padded = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-4.0, -5.0, -6.0, -7.0]])
    pad_mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(M.sequence_logps(padded, pad_mask), torch.tensor([-5.0, -7.0]))
    torch.testing.assert_close(M.mean_logps(padded, pad_mask), torch.tensor([-2.5, -7.0]))


def test_per_token_kl_and_masked_mean():
    p = torch.tensor([[[0.0, LN3], [1.0, 2.0]]])
    q = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    kl = M.per_token_kl(p, q)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    torch.testing.assert_close(kl, torch.tensor([[expected, 0.0]]))
    torch.testing.assert_close(M.masked_mean(kl, torch.tensor([[1.0, 1.0]])), torch.tensor([expected / 2]))
    torch.testing.assert_close(M.masked_mean(kl, torch.tensor([[1.0, 0.0]])), torch.tensor([expected]))
    assert (M.per_token_kl(q, p) >= 0).all()


def test_perplexity():
    assert M.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert M.perplexity(0.0, 5) == 1.0


def test_preference_and_reward_accuracy():
    assert M.preference_accuracy(torch.tensor([-1.0, -5.0, -3.0]), torch.tensor([-2.0, -4.0, -3.0])) == pytest.approx(
        1 / 3
    )  # a tie is not a win
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    # r_chosen = 0.5 * ([-1, -2] - -2) = [0.5, 0]; r_rejected = 0.5 * ([-3, -1] - -2) = [-0.5, 0.5]
    torch.testing.assert_close(M.implicit_rewards(chosen, ref_chosen, 0.5), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(
        M.reward_margins(chosen, rejected, ref_chosen, ref_rejected, 0.5), torch.tensor([1.0, -0.5])
    )


def test_bootstrap_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.8, rng.random(300) < 0.6
    first = M.bootstrap_ci(a, 1000, seed=3)
    assert first == M.bootstrap_ci(a, 1000, seed=3)
    assert first != M.bootstrap_ci(a, 1000, seed=4)
    assert first[0] <= a.mean() <= first[1]
    paired = M.paired_bootstrap(a, b, 1000, seed=3)
    assert paired == M.paired_bootstrap(a, b, 1000, seed=3)
    assert paired["delta"] == pytest.approx(a.mean() - b.mean())
    assert paired["ci95"][0] <= paired["delta"] <= paired["ci95"][1]
    assert M.paired_bootstrap(a, a, 1000, seed=0) == {"delta": 0.0, "ci95": [0.0, 0.0]}
    # weighted: the mean of per-item means weighted by token counts is the pooled mean
    lo, hi = M.bootstrap_ci([1.0, 3.0], 1000, seed=0, weights=[3, 1])
    assert lo <= 1.5 <= hi
    with pytest.raises(ValueError):
        M.paired_bootstrap([1, 2], [1, 2, 3], 10, seed=0)


def test_retention_is_chance_corrected_per_parent_with_the_worst():
    """(model - chance) / (parent - chance) over each parent's own items, paired intervals; the worst's interval
    from the minimum inside each resample; a parent not above chance has none."""
    from pipeline.sweep import objective_value

    model = {"add": [1, 1, 0, 1], "mc": [1, 0, 1, 1, 1, 1]}
    parents = {"add": [1, 1, 1, 1], "mc": [1, 0, 1, 1, 1, 1], "blind": [0, 1, 0, 0]}
    chance = {"add": [0.0] * 4, "mc": [0.25] * 6, "blind": [0.25] * 4}
    model["blind"] = [1, 1, 1, 1]
    values, ci = M.retention(model, parents, chance, 1000, 0)
    assert values["add"] == 0.75  # generation: chance 0, model / parent
    assert values["mc"] == pytest.approx((5 / 6 - 0.25) / (5 / 6 - 0.25))  # four choices: 1/4 is no skill
    assert values["blind"] is None and ci["blind"] is None  # the parent is at chance on its own items
    assert values["worst"] == 0.75
    for key in ("add", "mc", "worst"):
        assert ci[key][0] <= values[key] <= ci[key][1]
    assert ci["worst"][0] <= min(ci["add"][0], ci["mc"][0]) + 1e-9  # the minimum's draws sit lower
    below = M.retention({"p": [0.25, 0.25]}, {"p": [1.0, 0.5]}, {"p": [0.25, 0.25]}, 100, 0)[0]
    assert below["p"] == 0.0  # a model at chance kept none of the parent's skill
    report = eval_report({"annealed": {"retention": {"add": 0.75, "worst": 0.75}}})
    assert objective_value(report, "annealed.retention.worst") == 0.75  # what a sweep can rank by


def test_generation_health_measures_and_seeded_sampling(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import generate, health

    h = health([([5, 6, 5, 6, 5], True), ([7], False), ([], True)])
    assert h == {"ends_with_eos": [1.0, 0.0, 1.0], "length": [5.0, 1.0, 0.0], "distinct_2": [0.5, 1.0, 1.0]}
    model = AutoModelForCausalLM.from_pretrained(tiny["add"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["add"])
    prompts = ["12+34=", "rev abc=", "56+78="]
    sample = {"temperature": 1.0, "top_p": 1.0, "seed": 3}
    first, again = (generate(model, tokenizer, prompts, 12, sample=sample) for _ in range(2))
    other = generate(model, tokenizer, prompts, 12, sample={**sample, "seed": 4})
    greedy = generate(model, tokenizer, prompts, 12)
    assert first == again and first != other  # seeded: the same seed, the same generations
    assert generate(model, tokenizer, prompts, 12, batch_size=2) == greedy  # left-padded batches, the same answers
    batched = [generate(model, tokenizer, prompts, 12, sample=sample, batch_size=2) for _ in range(2)]
    assert batched[0] == batched[1]
    for ids, ended in first + greedy:
        assert len(ids) <= 12 and (ended or len(ids) == 12) and tokenizer.eos_token_id not in ids


def test_paired_perplexity_bootstrap():
    # two texts of 2 and 1 tokens: model a has NLL ln 4 per token on both, b ln 2 per token
    nll_a, nll_b, tokens = [2 * math.log(4), math.log(4)], [2 * math.log(2), math.log(2)], [2, 1]
    out = M.paired_bootstrap_perplexity(nll_a, nll_b, tokens, 1000, seed=0)
    assert out["delta"] == pytest.approx(2.0) and out["ratio"] == pytest.approx(2.0)
    assert out["ci95"] == pytest.approx([2.0, 2.0]) and out["ratio_ci95"] == pytest.approx([2.0, 2.0])
    # b better on the long text only: the pooled ratio moves with which texts are drawn
    nll_b = [2 * math.log(2), math.log(4)]
    out = M.paired_bootstrap_perplexity(nll_a, nll_b, tokens, 1000, seed=0)
    assert out["ratio"] == pytest.approx(4 / 2 ** (4 / 3))  # pooled: exp(3 ln 4 / 3) / exp(4 ln 2 / 3)
    assert out["ratio_ci95"][0] == pytest.approx(1.0) and out["ratio_ci95"][1] == pytest.approx(2.0)
    assert out == M.paired_bootstrap_perplexity(nll_a, nll_b, tokens, 1000, seed=0)


def test_tokenization_matches_trl(tiny):
    """The stored reference log-probs are TRL's: scoring the reference with the eval's tokenisation gives them."""
    from transformers import AutoTokenizer

    from pipeline import scoring

    tokenizer = AutoTokenizer.from_pretrained(tiny["add"])
    ids, mask = scoring.tokenize_completion(tokenizer, "12+34=", "46", 64, "keep_start")
    assert tokenizer.decode(ids) == "12+34=46<eos>" and mask == [0] * 6 + [1] * 3
    ids, mask = scoring.tokenize_completion(tokenizer, "12+34=", "46", 7, "keep_start")
    assert len(ids) == 7 and sum(mask) == 1
    ids, mask = scoring.tokenize_text(tokenizer, "12+34=46", 64)
    assert len(ids) == 8 and mask == [0] + [1] * 7


# ------------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def eval_run(readme_run):
    """`python -m pipeline +merge=slerp`: merge, anneal and eval on the demo (shared with the other tests)."""
    run_dir, work, cache, result = readme_run
    return run_dir, work, cache, result


@pytest.mark.slow
def test_metrics_schema_and_demo_claims(eval_run):
    run_dir, _, _, result = eval_run
    entry = manifest.load(run_dir)["stages"]["eval"]
    assert entry["status"] == "done"
    report = json.loads(Path(entry["outputs"]["metrics"]).read_text())
    models = report["models"]
    assert set(models) == {"merged", "annealed", "parent:add", "parent:reverse"}
    for name, m in models.items():
        for key in ("preference_accuracy", "preference_accuracy_normalized", "kl_to_reference", "perplexity"):
            assert math.isfinite(m[key]), (name, key)
            lo, hi = m["ci95"][key]
            assert lo - 1e-9 <= m[key] <= hi + 1e-9, (name, key)
        assert set(m["benchmarks"]) == {"demo_add", "demo_reverse"}  # the demo's skills as lm-eval tasks
        for task, value in m["benchmarks"].items():
            lo, hi = m["ci95"]["benchmarks"][task]
            assert lo - 1e-9 <= value <= hi + 1e-9, (name, task)
        assert ("reward_accuracy" in m) == (name in ("merged", "annealed"))
    assert models["parent:add"]["kl_to_reference"] == 0.0  # slerp's base, the anneal reference
    # the README's demo claims, which hold on every machine (docs: the spread over seeds and CPUs)
    for parent, other in (("add", "reverse"), ("reverse", "add")):  # each parent: its own skill, not the other's
        assert models[f"parent:{parent}"]["benchmarks"][f"demo_{parent}"] > 0.9
        assert models[f"parent:{parent}"]["benchmarks"][f"demo_{other}"] < 0.1
    worst = {name: models[name]["retention"]["worst"] for name in ("merged", "annealed")}
    assert worst["merged"] < 0.5 < worst["annealed"]  # the merge loses a skill; the anneal brings it back in part
    bench = report["benchmarks"]
    assert bench["tasks"] == {
        t: {"metric": "exact_match", "items": 150, "chance": 0.0} for t in ("demo_add", "demo_reverse")
    }
    assert bench["parent_tasks"] == {"add": ["demo_add"], "reverse": ["demo_reverse"]}  # each the best parent's
    assert bench["unmatched"] == 0
    for parent in ("add", "reverse"):  # merged - each parent, paired on the same documents
        for task, d in bench["merged_vs_parents"][parent].items():
            own = models["merged"]["benchmarks"][task] - models[f"parent:{parent}"]["benchmarks"][task]
            assert d["delta"] == pytest.approx(own) and d["ci95"][0] <= d["delta"] <= d["ci95"][1]
    health = report["generation"]  # sampled generations for 64 held-out prompts, per model, and annealed - merged
    assert health["prompts"] == 64 and set(health["models"]) == set(models)
    for m in health["models"].values():
        assert 0 <= m["ends_with_eos"] <= 1 and 0 <= m["length"] <= health["max_new_tokens"]
        assert 0 < m["distinct_2"] <= 1
    for key, v in health["annealed_vs_merged"].items():
        assert v["regression"] == (key != "length" and v["ci95"][1] < 0)
    for name in ("merged", "annealed"):  # each parent's own task, exact match (chance 0): model / parent
        retention = models[name]["retention"]
        assert set(retention) == {"add", "reverse", "worst"} and retention["worst"] == min(
            retention["add"], retention["reverse"]
        )
        for parent in ("add", "reverse"):
            task = f"demo_{parent}"
            own = models[name]["benchmarks"][task] / models[f"parent:{parent}"]["benchmarks"][task]
            assert retention[parent] == pytest.approx(own)
            lo, hi = models[name]["ci95"]["retention"][parent]
            assert lo - 1e-9 <= retention[parent] <= hi + 1e-9
    assert report["heldout_pairs"] == 300
    comparison = report["comparison"]["annealed_vs_merged"]
    for key in (
        "preference_accuracy",
        "preference_accuracy_normalized",
        "reward_accuracy",
        "reward_margin",
        "kl_to_reference",
        "perplexity",
    ):
        assert {"delta", "ci95"} <= set(comparison[key]), key
        assert comparison[key]["ci95"][0] <= comparison[key]["delta"] <= comparison[key]["ci95"][1], key
    assert set(comparison["benchmarks"]) == {"demo_add", "demo_reverse"}
    # the win rate: the annealed model's sampled answers against each other model's, by the demo's rule reward
    wins = report["win_rate"]
    assert wins["reward"] == "pipeline.demo.reward:reward" and wins["prompts"] == 64
    assert set(wins["vs"]) == {"merged", "parent:add", "parent:reverse"}
    for v in wins["vs"].values():
        assert v["n"] == 64 and v["wins"] + v["ties"] + v["losses"] == 64
        assert v["win_rate"] == pytest.approx((v["wins"] + v["ties"] / 2) / 64)
        for key in ("win_rate", "length_controlled", "reward_delta"):
            assert v[f"{key}_ci95"][0] - 1e-9 <= v[key] <= v[f"{key}_ci95"][1] + 1e-9, key
    assert wins["reward_accuracy"] == {"value": 1.0, "ci95": [1.0, 1.0], "pairs": 300}  # the rule knows the answers
    assert wins["warning"] is None
    audit = report["contamination"]
    assert audit["items"] == {"heldout_pairs": 300, "win_rate_prompts": 64, "benchmark_items": 300}
    assert audit["flagged"] is False and audit["training_rows_repeating_a_prompt"] == 0
    verdict = report["verdict"]
    assert verdict["capabilities"] in ("kept", "lost", "inconclusive") and verdict["answers"] != "not_measured"
    assert verdict["ship"] == (verdict["capabilities"] == "kept" and verdict["answers"] == "better")
    assert f"{models['annealed']['retention']['worst']:.2f}" in verdict["sentence"]
    assert f"{wins['vs']['merged']['win_rate']:.2f}" in verdict["sentence"]
    # the demo's claims
    assert comparison["preference_accuracy"]["ci95"][0] > 0, comparison["preference_accuracy"]
    assert report["perplexity_on"].endswith("heldout_text.jsonl")
    assert models["annealed"]["perplexity"] <= 1.10 * models["merged"]["perplexity"]
    assert comparison["perplexity"]["ratio"] == pytest.approx(
        models["annealed"]["perplexity"] / models["merged"]["perplexity"]
    )
    # report, plots, console table
    report_md = Path(entry["outputs"]["report"]).read_text()
    assert verdict["sentence"] in report_md.split("\n## ")[0]  # the verdict opens the report
    assert "Sample generations" in report_md and "parent:add" in report_md
    for plot in entry["outputs"]["plots"]:
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert "annealed - merged preference accuracy" in result.stdout
    assert report["scoring_seconds"] < 60 and entry["seconds"] < 120


@pytest.mark.slow
def test_eval_only_reevaluates_without_retraining(eval_run, tmp_path):
    """`pipeline.stages=[eval]` in a finished run folder (a copy: the shared run is only read) evaluates again, the
    same numbers, without touching what the anneal wrote."""
    from conftest import TEST_CACHE, run_in_process

    shared, work, cache, _ = eval_run
    run_dir = tmp_path / "run"
    shutil.copytree(shared, run_dir)
    stages = manifest.load(run_dir)["stages"]
    anneal_files = [p for p in Path(stages["anneal"]["outputs"]["model"]).iterdir()]
    before = {p: p.stat().st_mtime_ns for p in anneal_files}
    old = json.loads(Path(stages["eval"]["outputs"]["metrics"]).read_text())
    result = run_in_process(
        "pipeline.stages=[eval]",
        f"pipeline.cache_dir={cache}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.run.dir={run_dir}",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    after = manifest.load(run_dir)["stages"]
    assert after["anneal"] == stages["anneal"] and after["merge"] == stages["merge"]
    assert {p: p.stat().st_mtime_ns for p in anneal_files} == before
    assert Path(after["eval"]["outputs"]["metrics"]) == run_dir / "eval" / "metrics.json"
    new = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert new["models"]["annealed"]["preference_accuracy"] == old["models"]["annealed"]["preference_accuracy"]
    assert new["comparison"] == old["comparison"]  # deterministic: same seed, same numbers


@pytest.mark.slow
def test_benchmarks_items_are_a_seeded_sorted_spread_and_parent_tasks_are_named(eval_run, tmp_path, no_network):
    """Re-evaluated with eval.benchmarks.items=40 and each parent's tasks named: 40 documents per task, spread over
    the task (not its first 40), sorted, the same for every model and for the same seed; only `add` has its skills
    measured; no host asked for anything (the demo's tasks are local lm-eval tasks)."""
    from conftest import TEST_CACHE, run_in_process

    run_dir, work, cache, _ = eval_run
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)  # leave the shared run as it is
    result = run_in_process(
        "pipeline.stages=[eval]",
        f"pipeline.cache_dir={cache}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.run.dir={out}",
        "eval.benchmarks.items=40",
        "eval.benchmarks.parent_tasks={add: [demo_add]}",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "eval" / "metrics.json").read_text())
    items = json.loads((out / "eval" / "items.json").read_text())
    assert {t: v["items"] for t, v in report["benchmarks"]["tasks"].items()} == {"demo_add": 40, "demo_reverse": 40}
    docs = items["benchmark_docs"]["demo_add"]
    ids = [int(d.split(":")[0]) for d in docs]
    assert ids == sorted(ids) and ids != list(range(40)) and max(ids) < 150
    per_model = [m["benchmarks"]["demo_add"]["docs"] for m in items["models"].values()]
    assert len(per_model) == 4 and all(d == per_model[0] for d in per_model)
    assert [f"{d}:{h}" for d, h in per_model[0]] == docs
    assert report["benchmarks"]["parent_tasks"] == {"add": ["demo_add"]}
    assert set(report["models"]["annealed"]["retention"]) == {"add", "worst"}
    assert no_network == []
