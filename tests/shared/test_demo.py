"""Tests of the embedded demo (pipeline/demo/: tasks.py, build.py) and of pipeline/generation.py.

The demo is built once (143 s measured on 2 CPU cores) where the README's first command builds it (the
merge-anneal cache, or $MERGE_ANNEAL_TEST_CACHE) and reused afterwards; the tests that need it are marked
`slow`.
"""

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import random
import re
import subprocess
import sys
import warnings

import pytest

from pipeline import demo, generation
from pipeline.demo import build, tasks

REPO = pathlib.Path(__file__).resolve().parents[2]
MODELS = ("base", "add", "reverse")


@contextlib.contextmanager
def transformers_warnings():
    """Yields the list of WARNING-or-worse records transformers logs inside the block."""
    records = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ pure
def test_make_prompt_skill_and_expected_answer():
    assert tasks.make_prompt("add", (12, 34)) == "12+34="
    assert tasks.make_prompt("reverse", "abc") == "rev abc="
    assert tasks.skill_of("12+34=") == "add"
    assert tasks.skill_of("rev abc=") == "reverse"
    assert tasks.expected_answer("12+34=") == "46"
    assert tasks.expected_answer("99+99=") == "198"
    assert tasks.expected_answer("rev abc=") == "cba"
    assert tasks.expected_answer("rev abcdef=") == "fedcba"
    with pytest.raises(ValueError):
        tasks.make_prompt("mul", (1, 2))
    with pytest.raises(ValueError):
        tasks.make_prompt("reverse", "Abc")
    assert demo.SKILLS == tasks.SKILLS == ("add", "reverse")


@pytest.mark.parametrize("bad", ["", "12+34", "rev ABC=", "rev abc", "hello", "12-34="])
def test_a_prompt_of_neither_task_has_no_skill_and_no_answer(bad):
    with pytest.raises(ValueError):
        tasks.skill_of(bad)
    with pytest.raises(ValueError):
        tasks.expected_answer(bad)


def test_recipe_hash_and_demo_dir_are_pure(tmp_path):
    h = demo.recipe_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert h == demo.recipe_hash()
    json.dumps(demo.RECIPE)  # JSON-serialisable
    d = demo.demo_dir(tmp_path / "x" / ".." / "cache")
    assert d == (tmp_path / "cache").resolve() / "demo" / h
    assert not (tmp_path / "cache").exists()  # builds nothing


def test_tokenizer_round_trip_and_chat_template():
    tok = build.build_tokenizer()
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
    ids = {t: i for i, t in enumerate(build._vocab())}
    x, y = build._encode_batch(["12+34=", "rev abcd="], ids, tok.eos_token_id, tok.pad_token_id)
    assert x[1].tolist() == tok("rev abcd=dcba<eos>").input_ids
    assert y[1].tolist() == tok("rev abcd=dcba<eos>").input_ids  # the whole text is modelled
    assert y[0].tolist()[len("12+34=46") + 1 :] == [-100] * (len(x[0]) - len("12+34=46") - 1)  # padding
    assert x[0].tolist()[:9] == tok("12+34=46<eos>").input_ids
    assert x[0].tolist()[9:] == [tok.pad_token_id] * 5 and y[0].tolist()[9:] == [-100] * 5


def test_sft_sampler_never_yields_heldout_prompts():
    held = build._heldout_set()
    rng = random.Random(0)
    drawn = []
    for _ in range(300):
        drawn += build._sample_sft_batch(rng, {"add": 32, "reverse": 32}, held)
    assert len(drawn) == 300 * 64
    assert not set(drawn) & held
    assert {tasks.skill_of(p) for p in drawn} == set(tasks.SKILLS)


def test_data_is_pure_and_deterministic():
    a, b = build.build_data(), build.build_data()
    assert a == b


def test_answer_key():
    assert tasks.answer_key("12+34=") == ("add", "46")
    assert tasks.answer_key("99+99=") == ("add", "198")
    assert tasks.answer_key("rev abc=") == ("reverse", "cba")
    data = build.build_data()
    for r in data["train"] + data["heldout"]:
        assert tasks.answer_key(r["prompt"]) == (r["skill"], r["chosen"])
    with pytest.raises(ValueError):
        tasks.rejected_answer("12+34=", "nonsense", random.Random(0))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "12+34",
        "rev ABC=",
        "rev abc",
        "hello",
        "12-34=",
        "12+34=\n",
        " 12+34=",
        "rev abc=cba",
        "The capital of France is",
        None,
        12,
    ],
)
def test_the_answer_key_knows_only_the_demos_prompts(bad):
    assert tasks.answer_key(bad) is None


def test_recipe_hash_is_recipe_build_and_tasks(monkeypatch):
    """The cache key is RECIPE plus the sources of build.py and tasks.py: nothing else is read (in particular
    not pipeline/generation.py, so changing the decoder never rebuilds the demo)."""
    h = hashlib.sha256(json.dumps(demo.RECIPE, sort_keys=True).encode())
    for path in (build.__file__, tasks.__file__):
        h.update(b"\0")
        h.update(pathlib.Path(path).read_bytes())
    assert demo.recipe_hash() == h.hexdigest()[:16]

    read = []
    real_read_bytes = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: read.append(self.resolve()) or real_read_bytes(self))
    demo.recipe_hash()
    assert sorted(read) == sorted(pathlib.Path(p).resolve() for p in (build.__file__, tasks.__file__))
    assert pathlib.Path(generation.__file__).resolve() not in read

    monkeypatch.setitem(demo.RECIPE["eval"], "max_new_tokens", 9)
    assert demo.recipe_hash() != h.hexdigest()[:16]


def test_recipe_hash_ignores_generation_code(tmp_path):
    """In a copy of the package: editing generation.py or the cache handling (pipeline/demo/__init__.py) keeps the
    hash, editing tasks.py changes it."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=ignore)
    shutil.copytree(REPO / "conf", tmp_path / "conf", ignore=ignore)

    def copy_hash() -> str:
        code = (
            f"import pipeline.demo as d; assert d.__file__.startswith({str(tmp_path)!r}), d.__file__; "
            "print(d.recipe_hash())"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            check=True,
        )
        return out.stdout.strip()

    assert copy_hash() == demo.recipe_hash()
    with open(tmp_path / "pipeline" / "generation.py", "a") as f:
        f.write("\n# a change to the decoder\n")
    with open(tmp_path / "pipeline" / "demo" / "__init__.py", "a") as f:
        f.write("\n# a change to the cache handling\n")
    assert copy_hash() == demo.recipe_hash()
    with open(tmp_path / "pipeline" / "demo" / "tasks.py", "a") as f:
        f.write("\n# a change to the tasks\n")
    assert copy_hash() != demo.recipe_hash()


def test_imports_are_light():
    code = (
        "import sys, pipeline.demo as d, pipeline.demo.tasks, pipeline.generation; "
        "d.RECIPE, d.SKILLS, d.demo_dir('.'), d.recipe_hash(), d.ensure_demo; "
        "heavy = {'torch', 'transformers', 'tokenizers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ------------------------------------------------------------------------------------------ built
@pytest.mark.slow
def test_layout(demo_path):
    assert demo_path == demo.demo_dir(demo_path.parents[1])
    for name in MODELS:
        d = demo_path / name
        for f in (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ):
            assert (d / f).is_file(), d / f
        gen = json.loads((d / "generation_config.json").read_text())
        assert gen["eos_token_id"] == 1 and gen["pad_token_id"] == 0
    for f in ("train.jsonl", "heldout.jsonl", "heldout_text.jsonl"):
        assert (demo_path / "data" / f).is_file()
    rec = json.loads((demo_path / "recipe.json").read_text())
    assert rec["hash"] == demo_path.name == demo.recipe_hash()
    assert rec["recipe"] == json.loads(json.dumps(demo.RECIPE))
    assert not list(demo_path.parent.glob(".*.partial-*"))


@pytest.mark.slow
def test_ensure_demo_does_not_rebuild(demo_path):
    before = {p: p.stat().st_mtime_ns for p in demo_path.rglob("*")}
    assert demo.ensure_demo(demo_path.parents[1]) == demo_path
    assert {p: p.stat().st_mtime_ns for p in demo_path.rglob("*")} == before


@pytest.mark.slow
def test_preference_data_invariants(demo_path):
    train = _read_jsonl(demo_path / "data" / "train.jsonl")
    held = _read_jsonl(demo_path / "data" / "heldout.jsonl")
    text = _read_jsonl(demo_path / "data" / "heldout_text.jsonl")
    assert len(train) == 4000 and len(held) == 300
    for rows, per_skill in ((train, 2000), (held, 150)):
        for skill in tasks.SKILLS:
            assert sum(r["skill"] == skill for r in rows) == per_skill
        for r in rows:
            assert set(r) == {"prompt", "chosen", "rejected", "skill"}
            assert tasks.skill_of(r["prompt"]) == r["skill"]
            assert r["chosen"] == tasks.expected_answer(r["prompt"])
            assert r["rejected"] and r["rejected"] != r["chosen"]
        assert len({r["prompt"] for r in rows}) == len(rows)  # no duplicate prompts within a split
    train_prompts = {r["prompt"] for r in train}
    held_prompts = {r["prompt"] for r in held}
    assert not train_prompts & held_prompts
    assert held_prompts == {p for ps in build.heldout_prompts().values() for p in ps}
    # held-out text corpus: the held-out prompts with their correct answers
    assert [t["text"] for t in text] == [r["prompt"] + r["chosen"] for r in held]

    # rejected answers mix the merge's real failure kinds roughly evenly
    for rows in (train, held):
        for skill in tasks.SKILLS:
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


@pytest.mark.slow
def test_accuracy_children_better_at_own_skill(demo_path):
    acc = json.loads((demo_path / "accuracy.json").read_text())
    assert set(acc) == set(MODELS)
    for name in MODELS:
        assert set(acc[name]) == set(tasks.SKILLS)
        assert all(0.0 <= v <= 1.0 for v in acc[name].values())
    assert acc["add"]["add"] >= 0.9 and acc["reverse"]["reverse"] >= 0.9
    assert acc["add"]["add"] - acc["reverse"]["add"] >= 0.5
    assert acc["reverse"]["reverse"] - acc["add"]["reverse"] >= 0.5


@pytest.mark.slow
def test_models_load_cleanly_and_are_finite(demo_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_warnings() as records:
        for name in MODELS:
            tok = AutoTokenizer.from_pretrained(demo_path / name)
            model = AutoModelForCausalLM.from_pretrained(demo_path / name)
            assert type(model).__name__ == "LlamaForCausalLM"
            assert model.dtype == torch.float32
            assert not model.config.tie_word_embeddings
            assert model.config.vocab_size == len(tok) == 99
            assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
            assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
            assert all(torch.isfinite(p).all() for p in model.parameters())
            assert (
                tok.apply_chat_template(
                    [{"role": "user", "content": "rev abc="}, {"role": "assistant", "content": "cba"}], tokenize=False
                )
                == "rev abc=cba<eos>"
            )
    assert not [r.getMessage() for r in records]


@pytest.mark.slow
def test_exact_match_agrees_with_accuracy_json(demo_path):
    acc = json.loads((demo_path / "accuracy.json").read_text())
    held = build.heldout_prompts()
    assert build.exact_match(demo_path / "add", held["add"]) == acc["add"]["add"]
    assert build.exact_match(demo_path / "add", ["12+34=", "50+50="]) == 1.0


def _argmax_reference(model, tok, prompts, max_new_tokens):
    """Plain greedy decoding, one prompt at a time, recomputing the whole sequence each step (no cache)."""
    import torch

    out = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([tok(p, add_special_tokens=False).input_ids])
            new = []
            for _ in range(max_new_tokens):
                nxt = int(model(input_ids=x).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
            out.append(tok.decode(new, skip_special_tokens=False))
    return out


@pytest.mark.slow
def test_greedy_answers_match_an_argmax_loop(demo_path):
    """generation.greedy_answers (model.generate, KV cache, batched by length) == the plain argmax loop, on the
    demo models and on an untrained one (which never says EOS), without a warning; answers keep prompt order."""
    import torch
    import transformers

    held = build.heldout_prompts()
    prompts = [
        "12+34=",
        "rev abcdef=",
        "50+50=",
        "rev abc=",
        "99+99=",
        "hello",
        "rev zz=",
        "1+1=",
        *held["add"][:4],
        *held["reverse"][:4],
    ]
    tok = transformers.AutoTokenizer.from_pretrained(demo_path / "base")
    models = {name: transformers.AutoModelForCausalLM.from_pretrained(demo_path / name) for name in MODELS}
    torch.manual_seed(0)
    models["untrained"] = transformers.LlamaForCausalLM(build._model_config(tok)).eval()
    # a checkpoint's own sampling settings and logits processors do not apply: greedy means argmax
    models["untrained"].generation_config = transformers.GenerationConfig(
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=0.5,
        repetition_penalty=2.0,
        suppress_tokens=[tok.convert_tokens_to_ids("C")],
    )
    saved = models["untrained"].generation_config

    with transformers_warnings() as records:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, model in models.items():
                for max_new_tokens in (8, 2):
                    got = generation.greedy_answers(model, tok, prompts, max_new_tokens)
                    assert got == _argmax_reference(model, tok, prompts, max_new_tokens), (name, max_new_tokens)
                    if name == "untrained":
                        assert all(len(a) == max_new_tokens for a in got)  # ran to the limit, no EOS
    assert not [r.getMessage() for r in records]
    assert not [str(w.message) for w in caught]
    assert models["untrained"].generation_config is saved
    assert generation.greedy_answers(models["add"], tok, ["12+34=", "rev abc="], 8)[0] == "46"
    assert generation.greedy_answers(models["add"], tok, ["12+34="], 0) == [""]


def test_failed_build_leaves_nothing_complete(tmp_path, monkeypatch):
    def boom(out):
        (out / "base").mkdir()
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build, "build_into", boom)
    with pytest.raises(RuntimeError):
        demo.ensure_demo(tmp_path)
    assert not demo.demo_dir(tmp_path).exists()
    assert not list((tmp_path / "demo").glob(".*.partial-*"))


def test_build_is_deterministic(tmp_path, monkeypatch):
    """Two builds from the fixed seeds are byte-identical (on a shortened recipe: the full build takes minutes,
    and the session's demo fixture is built by the same code)."""
    monkeypatch.setitem(demo.RECIPE["base"], "steps", 10)
    monkeypatch.setitem(demo.RECIPE["children"], "steps", 10)
    first, second = demo.ensure_demo(tmp_path / "a"), demo.ensure_demo(tmp_path / "b")
    assert first.name == second.name == demo.recipe_hash()
    files = [f"{m}/model.safetensors" for m in MODELS] + [
        "data/train.jsonl",
        "data/heldout.jsonl",
        "data/heldout_text.jsonl",
        "accuracy.json",
    ]
    for f in files:
        assert _sha256(first / f) == _sha256(second / f), f
