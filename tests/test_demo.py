"""Tests of the embedded demo builder (pipeline/demo.py).

The demo is built once per test session (about 2 minutes on 2 CPU cores) into
$MERGE_ANNEAL_TEST_CACHE or <repo>/outputs/.test-cache, and reused across local runs.
"""

import hashlib
import json
import logging
import pathlib
import random
import re

import pytest

from pipeline import demo

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("base", "add", "reverse")


def _read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ pure
def test_make_prompt_skill_and_expected_answer():
    assert demo.make_prompt("add", (12, 34)) == "12+34="
    assert demo.make_prompt("reverse", "abc") == "rev abc="
    assert demo.skill_of("12+34=") == "add"
    assert demo.skill_of("rev abc=") == "reverse"
    assert demo.expected_answer("12+34=") == "46"
    assert demo.expected_answer("99+99=") == "198"
    assert demo.expected_answer("rev abc=") == "cba"
    assert demo.expected_answer("rev abcdef=") == "fedcba"
    for bad in ("", "12+34", "rev ABC=", "rev abc", "hello", "12-34="):
        with pytest.raises(ValueError):
            demo.skill_of(bad)
        with pytest.raises(ValueError):
            demo.expected_answer(bad)
    with pytest.raises(ValueError):
        demo.make_prompt("mul", (1, 2))
    with pytest.raises(ValueError):
        demo.make_prompt("reverse", "Abc")
    assert demo.SKILLS == ("add", "reverse")


def test_recipe_hash_and_demo_dir_are_pure(tmp_path):
    h = demo.recipe_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert h == demo.recipe_hash()
    json.dumps(demo.RECIPE)  # JSON-serialisable
    d = demo.demo_dir(tmp_path / "x" / ".." / "cache")
    assert d == (tmp_path / "cache").resolve() / "demo" / h
    assert not (tmp_path / "cache").exists()  # builds nothing


def test_tokenizer_round_trip_and_chat_template():
    tok = demo.build_tokenizer()
    assert len(tok) == 99
    assert tok.bos_token is None
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    for text in ("12+34=", "rev abc=", "a b\n~!", "99+99=198"):
        ids = tok(text).input_ids
        assert len(ids) == len(text)  # one id per character, nothing added
        assert tok.decode(ids) == text
    assert tok("12+34=46<eos>").input_ids[-1] == tok.eos_token_id
    msgs = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "12+34=46<eos>"
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == "12+34="
    # the build's fast encoder agrees with the tokenizer
    ids = {t: i for i, t in enumerate(demo._vocab())}
    x, y = demo._encode_batch(["12+34=", "rev abcd="], ids, tok.eos_token_id, tok.pad_token_id)
    assert x[1].tolist() == tok("rev abcd=dcba<eos>").input_ids
    assert y[1].tolist() == tok("rev abcd=dcba<eos>").input_ids  # the whole text is modelled
    assert y[0].tolist()[len("12+34=46") + 1:] == [-100] * (len(x[0]) - len("12+34=46") - 1)  # padding
    assert x[0].tolist()[:9] == tok("12+34=46<eos>").input_ids
    assert x[0].tolist()[9:] == [tok.pad_token_id] * 5 and y[0].tolist()[9:] == [-100] * 5


def test_sft_sampler_never_yields_heldout_prompts():
    held = demo._heldout_set()
    rng = random.Random(0)
    drawn = []
    for _ in range(300):
        drawn += demo._sample_sft_batch(rng, {"add": 32, "reverse": 32}, held)
    assert len(drawn) == 300 * 64
    assert not set(drawn) & held
    assert {demo.skill_of(p) for p in drawn} == set(demo.SKILLS)


def test_data_is_pure_and_deterministic():
    a, b = demo.build_data(), demo.build_data()
    assert a == b


# ------------------------------------------------------------------------------------------ built
def test_layout(demo_path):
    assert demo_path == demo.demo_dir(demo_path.parents[1])
    for name in MODELS:
        d = demo_path / name
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja"):
            assert (d / f).is_file(), d / f
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == 1 and gen["pad_token_id"] == 0
    for f in ("train.jsonl", "heldout.jsonl", "heldout_text.jsonl"):
        assert (demo_path / "data" / f).is_file()
    rec = json.loads((demo_path / "recipe.json").read_text())
    assert rec["hash"] == demo_path.name == demo.recipe_hash()
    assert rec["recipe"] == json.loads(json.dumps(demo.RECIPE))
    assert not list(demo_path.parent.glob(".*.tmp-*"))


def test_ensure_demo_does_not_rebuild(demo_path):
    before = {p: p.stat().st_mtime_ns for p in demo_path.rglob("*")}
    assert demo.ensure_demo(demo_path.parents[1]) == demo_path
    assert {p: p.stat().st_mtime_ns for p in demo_path.rglob("*")} == before


def test_preference_data_invariants(demo_path):
    train = _read_jsonl(demo_path / "data" / "train.jsonl")
    held = _read_jsonl(demo_path / "data" / "heldout.jsonl")
    text = _read_jsonl(demo_path / "data" / "heldout_text.jsonl")
    assert len(train) == 4000 and len(held) == 300
    for rows, per_skill in ((train, 2000), (held, 150)):
        for skill in demo.SKILLS:
            assert sum(r["skill"] == skill for r in rows) == per_skill
        for r in rows:
            assert set(r) == {"prompt", "chosen", "rejected", "skill"}
            assert demo.skill_of(r["prompt"]) == r["skill"]
            assert r["chosen"] == demo.expected_answer(r["prompt"])
            assert r["rejected"] and r["rejected"] != r["chosen"]
        assert len({r["prompt"] for r in rows}) == len(rows)  # no duplicate prompts within a split
    train_prompts = {r["prompt"] for r in train}
    held_prompts = {r["prompt"] for r in held}
    assert not train_prompts & held_prompts
    assert held_prompts == {p for ps in demo.heldout_prompts().values() for p in ps}
    # held-out text corpus: the held-out prompts with their correct answers
    assert [t["text"] for t in text] == [r["prompt"] + r["chosen"] for r in held]

    # rejected answers mix the merge's real failure kinds roughly evenly
    for rows in (train, held):
        for skill in demo.SKILLS:
            rs = [r for r in rows if r["skill"] == skill]
            kinds = {"extra": 0, "drop": 0, "same_length": 0}
            for r in rs:
                c, x = r["chosen"], r["rejected"]
                if x.startswith(c) and len(x) == len(c) + 1:
                    kinds["extra"] += 1
                elif c.startswith(x) and len(x) == len(c) - 1:
                    kinds["drop"] += 1
                else:
                    assert len(x) == len(c) or skill == "add", r  # off-by-one can change length: 99 -> 100
                    kinds["same_length"] += 1
            n = len(rs)
            assert kinds["extra"] >= 0.2 * n and kinds["drop"] >= 0.2 * n, (skill, kinds)
            assert kinds["same_length"] >= 0.4 * n, (skill, kinds)


def test_accuracy_children_better_at_own_skill(demo_path):
    acc = json.loads((demo_path / "accuracy.json").read_text())
    assert set(acc) == set(MODELS)
    for name in MODELS:
        assert set(acc[name]) == set(demo.SKILLS)
        assert all(0.0 <= v <= 1.0 for v in acc[name].values())
    assert acc["add"]["add"] >= 0.9 and acc["reverse"]["reverse"] >= 0.9
    assert acc["add"]["add"] - acc["reverse"]["add"] >= 0.5
    assert acc["reverse"]["reverse"] - acc["add"]["reverse"] >= 0.5


def test_models_load_cleanly_and_are_finite(demo_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Collect(level=logging.WARNING)
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        for name in MODELS:
            tok = AutoTokenizer.from_pretrained(demo_path / name)
            model = AutoModelForCausalLM.from_pretrained(demo_path / name)
            assert type(model).__name__ == "LlamaForCausalLM"
            assert model.dtype == torch.float32
            assert not model.config.tie_word_embeddings
            assert model.config.vocab_size == len(tok) == 99
            assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
            assert (model.lm_head.weight.data_ptr()
                    != model.get_input_embeddings().weight.data_ptr())
            assert all(torch.isfinite(p).all() for p in model.parameters())
            assert tok.apply_chat_template(
                [{"role": "user", "content": "rev abc="}, {"role": "assistant", "content": "cba"}],
                tokenize=False) == "rev abc=cba<eos>"
    finally:
        hf_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records]


def test_exact_match_agrees_with_accuracy_json(demo_path):
    acc = json.loads((demo_path / "accuracy.json").read_text())
    held = demo.heldout_prompts()
    assert demo.exact_match(demo_path / "add", held["add"]) == acc["add"]["add"]
    assert demo.exact_match(demo_path / "add", ["12+34=", "50+50="]) == 1.0


def test_failed_build_leaves_nothing_complete(tmp_path, monkeypatch):
    def boom(out):
        (out / "base").mkdir()
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo, "_build", boom)
    with pytest.raises(RuntimeError):
        demo.ensure_demo(tmp_path)
    assert not demo.demo_dir(tmp_path).exists()
    assert not list((tmp_path / "demo").glob(".*.tmp-*"))


def test_build_is_deterministic(tmp_path, monkeypatch):
    """Two builds from the fixed seeds are byte-identical (on a shortened recipe: the full build takes minutes,
    and the session's demo fixture is built by the same code)."""
    monkeypatch.setitem(demo.RECIPE["base"], "steps", 20)
    monkeypatch.setitem(demo.RECIPE["children"], "steps", 20)
    first, second = demo.ensure_demo(tmp_path / "a"), demo.ensure_demo(tmp_path / "b")
    assert first.name == second.name == demo.recipe_hash()
    files = [f"{m}/model.safetensors" for m in MODELS] + [
        "data/train.jsonl", "data/heldout.jsonl", "data/heldout_text.jsonl", "accuracy.json"]
    for f in files:
        assert _sha256(first / f) == _sha256(second / f), f
