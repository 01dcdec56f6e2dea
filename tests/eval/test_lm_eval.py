"""The optional lm-evaluation-harness integration (stages/eval/harness.py), run for real and offline.

Two tiny Llamas are scored on a custom multiple-choice task, "copy_last_char" (which letter ends the
prompt?), read from a local jsonl:

* ``parrot`` is built by hand to predict its last input token (one-hot embeddings and lm_head, the
  layer's output projections zeroed), so it must score exactly 1.0;
* ``random`` is a randomly initialised Llama: its accuracy must equal the one computed here directly
  from its own log-likelihoods of the choices.

Note: each run_lm_eval call indexes lm_eval's ~15k built-in task YAMLs (about 10 s on a slow CPU).
"""

import json
import math
import random
import sys

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline import UserError  # noqa: E402
from pipeline.demo.build import build_tokenizer  # noqa: E402
from stages.eval.harness import run_lm_eval  # noqa: E402

TASK = "copy_last_char"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _docs(n=12, seed=0):
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
    root = tmp_path_factory.mktemp("lm_eval")
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
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.5,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    models = {}
    for name in ("parrot", "random"):
        torch.manual_seed(1)  # the random model gets 5/12 (chance: 3/12), min margin 0.5 nats
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


def test_run_lm_eval_scores_match_the_models(task_env, no_network):
    docs, models = task_env["docs"], task_env["models"]
    scores = run_lm_eval(
        {
            "tasks": [TASK],
            "include_path": str(task_env["task_dir"]),
            "num_fewshot": 0,
            "limit": None,
            "batch_size": 4,
            "device": "cpu",
        },
        models,
    )

    assert set(scores) == {"parrot", "random"}
    for name in scores:
        metrics = scores[name][TASK]
        assert set(metrics) == {"acc,none", "acc_stderr,none", "sample_len"}  # "alias", "name" dropped
        assert metrics["sample_len"] == len(docs)  # limit=None: every doc
        assert type(metrics["acc,none"]) is float and type(metrics["acc_stderr,none"]) is float
        json.dumps(scores, allow_nan=False)
        assert 0.0 <= metrics["acc,none"] <= 1.0

    assert scores["parrot"][TASK]["acc,none"] == 1.0
    assert scores["parrot"][TASK]["acc_stderr,none"] == 0.0

    lls = _choice_logps(models["random"], docs)
    margins = [sorted(row)[-1] - sorted(row)[-2] for row in lls]
    assert min(margins) > 1e-3  # no near-ties that batching noise could flip
    hits = [max(range(4), key=row.__getitem__) == d["gold"] for row, d in zip(lls, docs)]
    acc = sum(hits) / len(hits)
    assert 0.0 < acc < 1.0  # a random model: neither perfect nor hopeless on these 12 docs
    assert scores["random"][TASK]["acc,none"] == pytest.approx(acc)
    stderr = math.sqrt(sum((h - acc) ** 2 for h in hits) / (len(hits) - 1) / len(hits))
    assert scores["random"][TASK]["acc_stderr,none"] == pytest.approx(stderr)

    assert no_network == []


def test_unknown_task_is_a_user_error_before_any_model_loads(task_env, tmp_path):
    with pytest.raises(UserError, match="no_such_task") as err:
        run_lm_eval(
            {"tasks": [TASK, "no_such_task"], "include_path": str(task_env["task_dir"])},
            {"never-built": tmp_path / "missing"},
        )
    assert "eval.lm_eval.include_path" in str(err.value)


def test_missing_lm_eval_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(UserError) as err:
        run_lm_eval({"tasks": [TASK]}, {})
    assert 'pip install "merge-anneal[lm_eval]"' in str(err.value)
    assert "eval.lm_eval=null" in str(err.value)
