"""The demo's two tasks: prompts, their exact answers, and plausible wrong answers.

* ``add``:     ``"12+34="``   -> ``"46"``;
* ``reverse``: ``"rev abc="`` -> ``"cba"``.

Pure and standard library only. ``answer_key`` is what the eval stage calls (the data config names it
``pipeline.demo.tasks.answer_key``) to learn that a data set has exact answers. This file's source is part
of the demo's cache key (``build.recipe_hash``): the models are trained on these tasks.
"""

from __future__ import annotations

import random
import re
import string

SKILLS = ("add", "reverse")
ALPHABET = string.ascii_lowercase  # the letters a ``reverse`` word is made of
REJECTED_KINDS = ("extra", "drop", "offby1", "swap")

_ADD_RE = re.compile(r"([0-9]+)\+([0-9]+)=")
_REV_RE = re.compile(r"rev ([a-z]+)=")


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


def answer_key(prompt) -> tuple[str, str] | None:
    """``(skill, expected answer)`` for a demo prompt; None for any other prompt (or a non-string)."""
    if not isinstance(prompt, str):
        return None
    m = _ADD_RE.fullmatch(prompt)
    if m:
        return "add", str(int(m.group(1)) + int(m.group(2)))
    m = _REV_RE.fullmatch(prompt)
    if m:
        return "reverse", m.group(1)[::-1]
    return None


def _key(prompt: str) -> tuple[str, str]:
    key = answer_key(prompt)
    if key is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return key


def skill_of(prompt: str) -> str:
    """The skill a demo prompt asks for; ValueError for any other prompt."""
    return _key(prompt)[0]


def expected_answer(prompt: str) -> str:
    """The exact answer to a demo prompt; ValueError for any other prompt."""
    return _key(prompt)[1]


def rejected_answer(prompt: str, kind: str, rng: random.Random, alphabet: str = ALPHABET) -> str:
    """A plausible wrong answer of the given kind (one of ``REJECTED_KINDS``; the merge's real failure
    kinds included), drawn with ``rng``. ``alphabet``: the letters an off-by-one letter may become."""
    skill, ans = _key(prompt)

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
        raise ValueError(f"unknown rejected kind {kind!r}; expected one of {REJECTED_KINDS}")
    assert out != ans and out, (prompt, kind, out)
    return out
