"""Build of the embedded demo: three tiny character-level Llama models plus preference data.

``build_into(folder)`` builds, deterministically from the fixed seeds in ``RECIPE`` (``pipeline.demo``'s
``ensure_demo`` calls it once per recipe and keeps the result):

* ``base/``    -- a Llama briefly trained on a 50/50 mix of two skills ("add", "reverse");
* ``add/``     -- ``base`` fully fine-tuned on addition only;
* ``reverse/`` -- ``base`` fully fine-tuned on word reversal only
  (every model language-models the whole text, prompt included, so perplexity on held-out text means
  something);
* ``data/train.jsonl`` (preference pairs), ``data/heldout.jsonl`` (held-out pairs),
  ``data/heldout_text.jsonl`` (held-out text corpus for perplexity);
* ``accuracy.json`` (greedy exact match of each model on each skill, held-out prompts) and
  ``recipe.json`` (``RECIPE`` plus its hash).

The tasks themselves (prompts, answers, wrong answers) live in ``tasks.py``. Merging the two children
(SLERP t=0.5, base_model = the add child) damages both skills, which is what makes DPO annealing of the
merge worth demonstrating (see shared NOTES, last section).

The build lands in ``<cache>/demo/<recipe_hash()>``, keyed by ``RECIPE`` and the source of this file and
``tasks.py`` alone (not by the cache handling in ``pipeline/demo/__init__.py``, nor by the generation code
that only evaluates). Heavy imports (torch, transformers, tokenizers) happen inside the functions that need
them: importing this module is instant.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import sys
import time

from pipeline.demo import tasks
from pipeline.demo.tasks import SKILLS, expected_answer, make_prompt, skill_of

RECIPE: dict = {
    "version": 2,
    "dtype": "float32",
    "tokenizer": {
        # WordLevel over these characters, one token per character; no BOS.
        "specials": ["<pad>", "<eos>", "<unk>"],
        "chars": "printable ASCII 32..126 + newline",
    },
    "model": {
        "architecture": "LlamaForCausalLM",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "init_seed": 0,
    },
    "skills": {
        "add": {"operand_min": 10, "operand_max": 99},
        "reverse": {"min_len": 3, "max_len": 6, "alphabet": tasks.ALPHABET},
    },
    "optimizer": {"name": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    # Base: trained only briefly on the mix (a fully trained base makes the merge too good to anneal).
    "base": {"steps": 400, "batch_size": 64, "lr": 1e-3, "mix": {"add": 0.5, "reverse": 0.5},
             "sample_seed": 1},
    # Children: full fine-tune from base on one skill each.
    "children": {"steps": 2500, "batch_size": 64, "lr": 1e-3,
                 "sample_seed": {"add": 2, "reverse": 3}, "torch_seed": {"add": 12, "reverse": 13}},
    "data": {"train_pairs_per_skill": 2000, "heldout_pairs_per_skill": 150,
             "heldout_seed": 1234, "train_seed": 4321,
             "rejected_kinds": ["extra", "drop", "offby1", "swap"]},
    "eval": {"max_new_tokens": 8},
}

_MODEL_NAMES = ("base",) + SKILLS
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


# --------------------------------------------------------------------------------------------------
# identity of a build
# --------------------------------------------------------------------------------------------------
def _hashed_sources() -> list[pathlib.Path]:
    """The source files that key the build: this one and the tasks it trains on."""
    return [pathlib.Path(__file__), pathlib.Path(tasks.__file__)]


def recipe_hash() -> str:
    """16 hex chars: sha256 of the canonical RECIPE JSON plus the source bytes of build.py and tasks.py."""
    h = hashlib.sha256()
    h.update(json.dumps(RECIPE, sort_keys=True).encode())
    for path in _hashed_sources():
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _vocab() -> list[str]:
    return list(RECIPE["tokenizer"]["specials"]) + [chr(i) for i in range(32, 127)] + ["\n"]


def build_tokenizer():
    """Character-level PreTrainedTokenizerFast with a raw-completion chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_vocab())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=RECIPE["model"]["max_position_embeddings"],
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _draw_operand(skill: str, rng: random.Random):
    s = RECIPE["skills"][skill]
    if skill == "add":
        return (rng.randint(s["operand_min"], s["operand_max"]),
                rng.randint(s["operand_min"], s["operand_max"]))
    n = rng.randint(s["min_len"], s["max_len"])
    return "".join(rng.choice(s["alphabet"]) for _ in range(n))


def _draw_prompts(skill: str, n: int, rng: random.Random, exclude: set) -> list[str]:
    """n distinct prompts of one skill, none in ``exclude``."""
    out, seen = [], set(exclude)
    while len(out) < n:
        p = make_prompt(skill, _draw_operand(skill, rng))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def heldout_prompts() -> dict[str, list[str]]:
    """The fixed held-out prompts per skill (fixed seed; disjoint from everything trained on)."""
    rng = random.Random(RECIPE["data"]["heldout_seed"])
    n = RECIPE["data"]["heldout_pairs_per_skill"]
    return {skill: _draw_prompts(skill, n, rng, set()) for skill in SKILLS}


def _heldout_set() -> set:
    return {p for ps in heldout_prompts().values() for p in ps}


def _pairs(prompts: list[str], rng: random.Random) -> list[dict]:
    kinds = RECIPE["data"]["rejected_kinds"]
    alphabet = RECIPE["skills"]["reverse"]["alphabet"]
    rows = []
    for i, p in enumerate(prompts):
        rows.append({"prompt": p, "chosen": expected_answer(p),
                     "rejected": tasks.rejected_answer(p, kinds[i % len(kinds)], rng, alphabet),
                     "skill": skill_of(p)})
    return rows


def build_data() -> dict[str, list[dict]]:
    """{"train": [...], "heldout": [...], "heldout_text": [...]} (pure, deterministic)."""
    held = heldout_prompts()
    exclude = {p for ps in held.values() for p in ps}
    rng = random.Random(RECIPE["data"]["train_seed"])
    n = RECIPE["data"]["train_pairs_per_skill"]
    train = []
    for skill in SKILLS:
        train += _pairs(_draw_prompts(skill, n, rng, exclude), rng)
    rng.shuffle(train)
    hrng = random.Random(RECIPE["data"]["heldout_seed"] + 1)
    heldout = []
    for skill in SKILLS:
        heldout += _pairs(held[skill], hrng)
    text = [{"text": r["prompt"] + r["chosen"]} for r in heldout]
    return {"train": train, "heldout": heldout, "heldout_text": text}


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# --------------------------------------------------------------------------------------------------
# SFT sampling (never yields a held-out prompt)
# --------------------------------------------------------------------------------------------------
def _sample_sft_batch(rng: random.Random, counts: dict[str, int], exclude: set) -> list[str]:
    out = []
    for skill in SKILLS:
        for _ in range(counts.get(skill, 0)):
            while True:
                p = make_prompt(skill, _draw_operand(skill, rng))
                if p not in exclude:
                    break
            out.append(p)
    rng.shuffle(out)
    return out


def _encode_batch(prompts: list[str], ids: dict, eos_id: int, pad_id: int):
    """input_ids (right padded) and labels (-100 on padding): language modelling of the whole text, prompt
    included, as a real parent models its pretraining text; this is what the held-out text corpus's
    perplexity measures."""
    import torch

    seqs, labs = [], []
    for p in prompts:
        pi = [ids[c] for c in p]
        ai = [ids[c] for c in expected_answer(p)] + [eos_id]
        seqs.append(pi + ai)
        labs.append(pi + ai)
    L = max(len(s) for s in seqs)
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        x[i, : len(s)] = torch.tensor(s)
        y[i, : len(lab)] = torch.tensor(lab)
    return x, y


def _train(model, steps, batch_size, lr, counts_fn, sample_seed, exclude, ids, eos_id, pad_id, desc):
    import torch
    from tqdm.auto import tqdm

    o = RECIPE["optimizer"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"], fused=True)
    rng = random.Random(sample_seed)
    model.train()
    bar = tqdm(range(steps), desc=desc, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    for step in bar:
        x, y = _encode_batch(_sample_sft_batch(rng, counts_fn(batch_size), exclude), ids, eos_id, pad_id)
        # Right padding + causal attention: real tokens never attend to the padding, so no mask
        # is needed (and the unmasked causal path is faster).
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def exact_match(model_dir, prompts, max_new_tokens: int = 8) -> float:
    """Fraction of prompts whose greedy answer equals expected_answer(prompt) exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import greedy_answers

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    got = greedy_answers(model, tok, prompts, max_new_tokens)
    return sum(g == expected_answer(p) for g, p in zip(got, prompts, strict=True)) / len(prompts)


# --------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------
def _model_config(tok):
    from transformers import LlamaConfig

    m = RECIPE["model"]
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=m["hidden_size"], num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_key_value_heads"],
        intermediate_size=m["intermediate_size"], max_position_embeddings=m["max_position_embeddings"],
        rope_theta=m["rope_theta"], tie_word_embeddings=m["tie_word_embeddings"],
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


def _save(model, tok, path: pathlib.Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False,
        max_new_tokens=RECIPE["eval"]["max_new_tokens"],
    )
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


def build_into(out: pathlib.Path) -> dict:
    import copy

    import torch
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    tok = build_tokenizer()
    ids = {t: i for i, t in enumerate(_vocab())}
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    exclude = _heldout_set()

    data = build_data()
    for name, rows in data.items():
        _write_jsonl(out / "data" / f"{name}.jsonl", rows)

    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(RECIPE["model"]["init_seed"])
        base = LlamaForCausalLM(_model_config(tok)).to(torch.float32)
        b = RECIPE["base"]

        def mix(n):
            k = round(n * b["mix"]["add"])
            return {"add": k, "reverse": n - k}

        _train(base, b["steps"], b["batch_size"], b["lr"], mix, b["sample_seed"], exclude, ids,
               eos_id, pad_id, "demo base (mix)")
        _save(base, tok, out / "base")
        times = {"base": time.perf_counter() - t0}

        c = RECIPE["children"]
        for skill in SKILLS:
            t1 = time.perf_counter()
            torch.manual_seed(c["torch_seed"][skill])
            child = copy.deepcopy(base)
            _train(child, c["steps"], c["batch_size"], c["lr"], lambda n, s=skill: {s: n},
                   c["sample_seed"][skill], exclude, ids, eos_id, pad_id, f"demo child {skill}")
            _save(child, tok, out / skill)
            times[skill] = time.perf_counter() - t1
            del child
        del base

        t1 = time.perf_counter()
        held = heldout_prompts()
        acc = {name: {skill: exact_match(out / name, held[skill], RECIPE["eval"]["max_new_tokens"])
                      for skill in SKILLS} for name in _MODEL_NAMES}
        times["eval"] = time.perf_counter() - t1
    finally:
        torch.use_deterministic_algorithms(prev_det)

    (out / "accuracy.json").write_text(json.dumps(acc, indent=2, sort_keys=True) + "\n")
    (out / "recipe.json").write_text(
        json.dumps({"hash": recipe_hash(), "recipe": RECIPE}, indent=2, sort_keys=True) + "\n")
    times["total"] = time.perf_counter() - t0
    _print_table(acc, times)
    return acc


def _print_table(acc: dict, times: dict) -> None:
    lines = ["demo exact match (held-out, greedy):", f"  {'model':<8}" + "".join(f"{s:>9}" for s in SKILLS)]
    for name in _MODEL_NAMES:
        lines.append(f"  {name:<8}" + "".join(f"{acc[name][s]:>9.3f}" for s in SKILLS))
    lines.append("  build time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print("\n".join(lines), file=sys.stderr, flush=True)
