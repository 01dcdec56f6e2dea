"""Contamination audit: does any eval item appear in the training pairs? Per kind of item (held-out pairs, benchmark
documents, win-rate prompts), how many share their text exactly with a training prompt, and how many share a 13-gram
(of lowercased whitespace tokens) with any training text (prompt, chosen or rejected); and how many training rows
repeat a prompt. Any overlap is flagged."""

from pipeline.preferences import prompt_key

NGRAM = 13


def ngrams(text: str, n: int = NGRAM) -> set[tuple]:
    tokens = text.lower().split()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def audit(train, items: dict[str, list[str]]) -> dict:
    """`train`: the training pairs (prompt, chosen, rejected); `items`: per kind, the eval items' texts."""
    prompts = [prompt_key(p) for p in train["prompt"]]
    seen = set(prompts)
    grams = set()
    for column in ("prompt", "chosen", "rejected"):
        for value in train[column]:
            grams |= ngrams(prompt_key(value))
    exact = {kind: sum(text in seen for text in texts) for kind, texts in items.items()}
    shared = {kind: sum(bool(ngrams(text) & grams) for text in texts) for kind, texts in items.items()}
    return {
        "items": {kind: len(texts) for kind, texts in items.items()},
        "exact": exact,
        f"ngram{NGRAM}": shared,
        "training_rows_repeating_a_prompt": len(prompts) - len(seen),
        "flagged": any(exact.values()) or any(shared.values()),
    }
