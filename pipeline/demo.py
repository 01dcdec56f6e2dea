"""Embedded demo: three tiny character-level Llama models plus preference data.

``ensure_demo(cache_dir)`` builds, deterministically from the fixed seeds in ``RECIPE``:

* ``base/``    -- a Llama briefly trained on a 50/50 mix of two skills ("add", "reverse");
* ``add/``     -- ``base`` fully fine-tuned on addition only;
* ``reverse/`` -- ``base`` fully fine-tuned on word reversal only
  (every model language-models the whole text, prompt included, so perplexity on held-out text means
  something);
* ``data/train.jsonl`` (preference pairs), ``data/heldout.jsonl`` (held-out pairs),
  ``data/heldout_text.jsonl`` (held-out text corpus for perplexity);
* ``accuracy.json`` (greedy exact match of each model on each skill, held-out prompts) and
  ``recipe.json`` (``RECIPE`` plus its hash).

Merging the two children (SLERP t=0.5, base_model = the add child) damages both skills, which is what
makes DPO annealing of the merge worth demonstrating (see shared NOTES, last section).

The build lands in ``<cache>/demo/<recipe_hash()>``; it is written into a sibling temp folder and
renamed into place at the end, so a folder that exists is complete. Heavy imports (torch,
transformers, tokenizers) happen inside the functions that need them: importing this module is instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import sys
import tempfile
import time

SKILLS = ("add", "reverse")

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
        "reverse": {"min_len": 3, "max_len": 6, "alphabet": "abcdefghijklmnopqrstuvwxyz"},
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
_ADD_RE = re.compile(r"^(\d+)\+(\d+)=$")
_REV_RE = re.compile(r"^rev ([a-z]+)=$")
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


# --------------------------------------------------------------------------------------------------
# identity of a build
# --------------------------------------------------------------------------------------------------
def recipe_hash() -> str:
    """16 hex chars: sha256 of the canonical RECIPE JSON plus this module's source text."""
    h = hashlib.sha256()
    h.update(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(b"\0")
    h.update(pathlib.Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def demo_dir(cache_dir) -> pathlib.Path:
    """Where the demo for the current recipe lives (or would live). Builds nothing."""
    return pathlib.Path(cache_dir).expanduser().resolve() / "demo" / recipe_hash()


# --------------------------------------------------------------------------------------------------
# pure task helpers (eval reuses them)
# --------------------------------------------------------------------------------------------------
def make_prompt(skill: str, operand) -> str:
    """add: operand = (a, b) -> "ab+cd="; reverse: operand = "xyz" -> "rev xyz="."""
    if skill == "add":
        a, b = operand
        return f"{int(a)}+{int(b)}="
    if skill == "reverse":
        if not isinstance(operand, str) or not re.fullmatch(r"[a-z]+", operand):
            raise ValueError(f"reverse operand must be lowercase letters, got {operand!r}")
        return f"rev {operand}="
    raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")


def skill_of(prompt: str) -> str:
    if _ADD_RE.match(prompt):
        return "add"
    if _REV_RE.match(prompt):
        return "reverse"
    raise ValueError(f"not a demo prompt: {prompt!r}")


def expected_answer(prompt: str) -> str:
    m = _ADD_RE.match(prompt)
    if m:
        return str(int(m.group(1)) + int(m.group(2)))
    m = _REV_RE.match(prompt)
    if m:
        return m.group(1)[::-1]
    raise ValueError(f"not a demo prompt: {prompt!r}")


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------
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


def _rejected(prompt: str, kind: str, rng: random.Random) -> str:
    """A plausible wrong answer of the given kind (the merge's real failure kinds included)."""
    ans = expected_answer(prompt)
    skill = skill_of(prompt)
    alphabet = RECIPE["skills"]["reverse"]["alphabet"]

    def offby1() -> str:
        if skill == "add":
            v = int(ans)
            return str(v + rng.choice((-1, 1)))
        i = rng.randrange(len(ans))
        c = ans[i]
        k = alphabet.index(c)
        choices = [j for j in (k - 1, k + 1) if 0 <= j < len(alphabet)]
        return ans[:i] + alphabet[rng.choice(choices)] + ans[i + 1:]

    if kind == "extra":  # not stopping: an extra digit appended / the last letter repeated
        out = ans + (str(rng.randrange(10)) if skill == "add" else ans[-1])
    elif kind == "drop":  # stopping too early: last digit / letter dropped
        out = ans[:-1]
    elif kind == "offby1":
        out = offby1()
    elif kind == "swap":  # two adjacent, different characters swapped
        pos = [i for i in range(len(ans) - 1) if ans[i] != ans[i + 1]]
        if pos:
            i = rng.choice(pos)
            out = ans[:i] + ans[i + 1] + ans[i] + ans[i + 2:]
        else:
            out = offby1()
    else:
        raise ValueError(kind)
    assert out != ans and out, (prompt, kind, out)
    return out


def _pairs(prompts: list[str], rng: random.Random) -> list[dict]:
    kinds = RECIPE["data"]["rejected_kinds"]
    rows = []
    for i, p in enumerate(prompts):
        rows.append({"prompt": p, "chosen": expected_answer(p),
                     "rejected": _rejected(p, kinds[i % len(kinds)], rng), "skill": skill_of(p)})
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
        for r in rows:
            f.write(json.dumps(r) + "\n")


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
    for i, (s, lab) in enumerate(zip(seqs, labs)):
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
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers (decoded new tokens up to, not including, the first EOS).

    Prompts are grouped by token length so no padding is needed.
    """
    import torch

    eos = tok.eos_token_id
    enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        groups.setdefault(len(e), []).append(i)
    answers = [""] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for _, idx in sorted(groups.items()):
            x = torch.tensor([enc[i] for i in idx], dtype=torch.long)
            start = x.shape[1]
            done = torch.zeros(len(idx), dtype=torch.bool)
            for _ in range(max_new_tokens):
                nxt = model(input_ids=x).logits[:, -1, :].argmax(-1)
                x = torch.cat([x, nxt[:, None]], dim=1)
                done |= nxt == eos
                if bool(done.all()):
                    break
            for row, i in enumerate(idx):
                new = x[row, start:].tolist()
                if eos in new:
                    new = new[: new.index(eos)]
                answers[i] = tok.decode(new, skip_special_tokens=False)
    return answers


def exact_match(model_dir, prompts, max_new_tokens: int = 8) -> float:
    """Fraction of prompts whose greedy answer equals expected_answer(prompt) exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    got = greedy_answers(model, tok, prompts, max_new_tokens)
    return sum(g == expected_answer(p) for g, p in zip(got, prompts)) / len(prompts)


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


def _build(out: pathlib.Path) -> dict:
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


def ensure_demo(cache_dir) -> pathlib.Path:
    """Build the demo if it is missing; return demo_dir(cache_dir). Never rebuilds one that exists."""
    final = demo_dir(cache_dir)
    if final.is_dir():
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if final.is_dir():  # someone else built it while we waited
            return final
        # Under the lock no other builder of this hash runs: leftovers of killed builds are stale.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            print(f"building demo models into {final} (one-off, ~2 min on 2 CPU cores)",
                  file=sys.stderr, flush=True)
            _build(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


if __name__ == "__main__":  # python -m pipeline.demo [cache_dir]
    print(ensure_demo(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/merge-anneal"))
