"""The benchmarks through lm-evaluation-harness (stages/eval/benchmarks.py), run for real and offline.

Two tiny Llamas, loaded once, are scored on a local multiple-choice task, "copy_last_char" (which letter ends the
prompt? four choices), read from a local jsonl:

* ``parrot`` is built by hand to predict its last input token (one-hot embeddings and lm_head, the layer's output
  projections zeroed), so it answers every item right;
* ``random`` is a randomly initialised Llama: its answer to each item must be the one computed here directly from
  its own log-likelihoods of the choices.

Retention and the paired deltas are then checked against values computed by hand from those items.
"""

import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import llama_settings
from pipeline import UserError
from pipeline.demo.build import build_tokenizer
from stages.eval import benchmarks
from stages.eval.settings import Benchmarks

TASK = "copy_last_char"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _docs(n=20, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        q = "".join(rng.sample(LETTERS, 3))
        choices = rng.sample([c for c in LETTERS if c != q[-1]], 3)
        gold = rng.randrange(4)
        choices.insert(gold, q[-1])
        docs.append({"q": q, "choices": choices, "gold": gold})
    return docs


@pytest.fixture(scope="module")
def task_env(tmp_path_factory):
    """The task folder (YAML + jsonl), the docs, and the two saved models."""
    root = tmp_path_factory.mktemp("benchmarks")
    docs = _docs()
    assert len({d["gold"] for d in docs}) > 1  # the gold position varies
    data = root / "data" / "copy.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task_dir = root / "tasks"
    task_dir.mkdir()
    (task_dir / f"{TASK}.yaml").write_text(
        yaml.safe_dump(
            {
                "task": TASK,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "q",  # field names: the context is the prompt itself,
                "doc_to_choice": "choices",  # the continuation one letter (no " " in between)
                "doc_to_target": "gold",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0},
            }
        )
    )

    tok = build_tokenizer()
    cfg = LlamaConfig(
        **llama_settings(tok, hidden_size=128, num_hidden_layers=1, intermediate_size=64, initializer_range=0.5)
    )
    models = {}
    for name in ("parrot", "random"):
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg)
        if name == "parrot":  # residual stream = one-hot(last token) -> logits peak on that token
            with torch.no_grad():
                one_hot = torch.eye(cfg.vocab_size, cfg.hidden_size)
                model.model.embed_tokens.weight.copy_(one_hot)
                model.lm_head.weight.copy_(one_hot)
                model.model.layers[0].self_attn.o_proj.weight.zero_()
                model.model.layers[0].mlp.down_proj.weight.zero_()
        models[name] = root / name
        model.save_pretrained(models[name])  # safetensors
        tok.save_pretrained(models[name])
    return {"task_dir": task_dir, "docs": docs, "models": models}


def _choice_logps(model_dir, docs):
    """Per doc, log p(choice | prompt) for each choice, straight from the model (no lm_eval)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for d in docs:
            ids = tok(d["q"], return_tensors="pt").input_ids
            assert ids.shape[1] == len(d["q"])  # one token per character, no specials added
            logp = model(ids).logits[0, -1].log_softmax(-1)
            out.append([logp[tok.convert_tokens_to_ids(c)].item() for c in d["choices"]])
    return out


@pytest.fixture(scope="module")
def scored(task_env):
    """Each model loaded once and run on a seeded sample of 12 of the 20 documents, as eval runs it."""
    settings = Benchmarks(tasks=[TASK], include_path=str(task_env["task_dir"]), items=12)
    suite = benchmarks.prepare(settings, seed=0)
    out = {}
    for name, folder in task_env["models"].items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out[name] = benchmarks.run(model, tokenizer, suite, batch_size=4, num_fewshot=None)
    return suite, out


def _hits(model_dir, docs):
    lls = _choice_logps(model_dir, docs)
    margins = [sorted(row)[-1] - sorted(row)[-2] for row in lls]
    assert min(margins) > 1e-3  # no near-ties that batching noise could flip
    return [float(max(range(4), key=row.__getitem__) == d["gold"]) for row, d in zip(lls, docs)]


def test_each_item_is_scored_as_the_model_answers_it(task_env, scored):
    suite, runs = scored
    docs = task_env["docs"]
    sample = suite.samples[TASK]
    assert sample == sorted(random.Random(f"0:{TASK}").sample(range(20), 12)) and sample != list(range(12))
    for run in runs.values():
        assert run[TASK]["metric"] == "acc" and sorted(run[TASK]["items"]) == sample
        assert {chance for _, chance, _ in run[TASK]["items"].values()} == {0.25}  # four choices
        assert [run[TASK]["texts"][d] for d in sample] == [docs[d]["q"] for d in sample]
    assert all(v == 1.0 for v, _, _ in runs["parrot"][TASK]["items"].values())
    hits = _hits(task_env["models"]["random"], [docs[d] for d in sample])
    assert [runs["random"][TASK]["items"][d][0] for d in sample] == hits
    assert 0 < sum(hits) < len(hits)  # a random model: neither perfect nor hopeless
    hashes = {name: [run[TASK]["items"][d][2] for d in sample] for name, run in runs.items()}
    assert hashes["parrot"] == hashes["random"] and len(set(hashes["parrot"])) == len(sample)


def test_retention_and_paired_deltas_equal_the_hand_computed_values(task_env, scored):
    """The parrot and the random model as the parents; as the merged model the random one, as the annealed the
    parrot. The task is the parrot's (its best parent): retention = (model - 1/4) / (parrot - 1/4)."""
    suite, runs = scored
    per_model = {"parent:parrot": runs["parrot"], "parent:random": runs["random"]}
    per_model |= {"merged": runs["random"], "annealed": runs["parrot"]}
    out = benchmarks.summarize(per_model, None, 500, 0)
    acc = sum(v for v, _, _ in runs["random"][TASK]["items"].values()) / 12
    assert out["parent_tasks"] == {"parrot": [TASK]}
    assert out["scores"]["merged"][TASK] == pytest.approx(acc) and out["scores"]["annealed"][TASK] == 1.0
    assert out["retention"]["merged"]["value"] == {
        "parrot": pytest.approx((acc - 0.25) / 0.75),
        "worst": pytest.approx((acc - 0.25) / 0.75),
    }
    assert out["retention"]["annealed"]["value"]["worst"] == 1.0
    lo, hi = out["retention"]["merged"]["ci95"]["worst"]
    assert lo <= (acc - 0.25) / 0.75 <= hi
    assert out["annealed_vs_merged"][TASK]["delta"] == pytest.approx(1 - acc)
    assert out["merged_vs_parents"]["parrot"][TASK]["delta"] == pytest.approx(acc - 1)
    assert out["tasks"][TASK] == {"metric": "acc", "items": 12, "chance": 0.25} and out["unmatched"] == 0
    # the task named the random parent's: it is above chance, and the parrot as the model keeps more than all of it
    named = benchmarks.summarize(per_model, {"random": [TASK]}, 500, 0)
    assert named["retention"]["annealed"]["value"]["random"] == pytest.approx(0.75 / (acc - 0.25))
    with pytest.raises(UserError, match="eval.benchmarks.parent_tasks"):
        benchmarks.summarize(per_model, {"nobody": [TASK]}, 10, 0)


def test_documents_that_differ_are_not_paired(scored):
    """Items pair on (task, doc_id) with equal doc_hash: a document that changed between two runs is left out and
    counted."""
    _, runs = scored
    items = dict(runs["random"][TASK]["items"])
    first = min(items)
    items[first] = (*items[first][:2], "another document")
    changed = {TASK: {**runs["random"][TASK], "items": items}}
    per_model = {"parent:parrot": runs["parrot"], "merged": runs["random"], "annealed": changed}
    out = benchmarks.summarize(per_model, None, 100, 0)
    assert out["unmatched"] == 1  # the annealed model's first document is not the merged model's
    assert out["annealed_vs_merged"][TASK] == {"delta": 0.0, "ci95": [0.0, 0.0]}  # the other 11, the same answers
    parrot = runs["parrot"][TASK]["items"]
    delta = sum(v - parrot[d][0] for d, (v, _, _) in runs["random"][TASK]["items"].items()) / 12
    assert out["merged_vs_parents"]["parrot"][TASK]["delta"] == pytest.approx(delta)  # all 12 pair


def test_bad_benchmark_settings_are_refused_before_any_model_loads(task_env, no_network):
    with pytest.raises(UserError, match="no_such_task") as err:
        benchmarks.check(Benchmarks(tasks=[TASK, "no_such_task"], include_path=str(task_env["task_dir"])))
    assert "eval.benchmarks.include_path" in str(err.value) and "eval/benchmarks=none" in str(err.value)
    # a built-in task on a machine that cannot reach the hub, its data not cached: told so at once
    with pytest.raises(UserError, match="eval/benchmarks=none") as err:
        benchmarks.check(Benchmarks(tasks=["arc_easy"]))
    assert "cannot be reached" in str(err.value) and "include_path" in str(err.value)
    benchmarks.check(Benchmarks(tasks=[TASK], include_path=str(task_env["task_dir"])))  # local: fine


def test_the_demo_suite_reads_no_network(no_network, tiny):
    """The demo's skills are local lm-eval tasks (pipeline/demo/benchmarks/): their documents are the held-out
    prompts of each skill with the exact answer, read from the held-out pairs the task's metadata names."""
    from pipeline import demo_benchmarks

    heldout = tiny.root / "data" / "heldout.jsonl"
    settings = Benchmarks(
        tasks=["demo_add", "demo_reverse"], include_path=demo_benchmarks(), metadata={"heldout": str(heldout)}
    )
    suite = benchmarks.prepare(settings, seed=0)
    rows = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    for skill in ("add", "reverse"):
        expected = {r["prompt"]: {"prompt": r["prompt"], "answer": r["chosen"]} for r in rows if r["skill"] == skill}
        assert list(suite.tasks[f"demo_{skill}"].eval_docs) == list(expected.values()) and expected
    assert no_network == []
