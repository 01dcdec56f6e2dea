"""Generation: greedy short answers (the demo's exact-match accuracy and the eval stage's samples), and seeded
generations with the measures of their health (the eval stage's `generation` block).

Not part of the demo's cache key: changing how answers are generated never rebuilds the demo models.
"""

from __future__ import annotations


def greedy_answers(model, tokenizer, prompts, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to ``prompts``, in order: the decoded new tokens up to, not including, the first EOS.

    ``model.generate`` with a KV cache and plain argmax decoding (the checkpoint's own generation_config,
    sampling flags and logits processors included, is not used), stopping at the tokenizer's EOS. Prompts
    are encoded without special tokens and grouped by token length, so no batch needs padding.
    """
    return [
        tokenizer.decode(ids, skip_special_tokens=False)
        for ids, _ in generate(model, tokenizer, prompts, max_new_tokens)
    ]


def generate(
    model, tokenizer, prompts, max_new_tokens: int, sample: dict | None = None, batch_size: int | None = None
) -> list[tuple[list, bool]]:
    """Per prompt, in order: the new token ids up to, not including, the first EOS, and whether an EOS came within
    ``max_new_tokens``. Greedy, or with ``sample`` ({temperature, top_p, seed}) sampled, torch seeded before each
    batch (the same seed, prompts and batch size give every model the same random draws per prompt). Without
    ``batch_size`` prompts of one token length go together, unpadded (exact); with it, up to that many prompts a
    batch, sorted by length and left-padded. The checkpoint's own generation_config is not used."""
    import torch
    from transformers import GenerationConfig

    prompts = list(prompts)
    if max_new_tokens < 1:
        return [([], False)] * len(prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    how = (
        dict(do_sample=True, temperature=float(sample["temperature"]), top_p=float(sample["top_p"]), top_k=0)
        if sample
        else dict(do_sample=False)
    )
    config = GenerationConfig(
        num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True, **how
    )
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    batches = batched(encoded, batch_size)

    out_ids: list = [([], False)] * len(prompts)
    model.eval()
    # generate() fills every field left unset in the config it is given from the checkpoint's own
    # generation_config (its temperature, repetition penalty, suppressed tokens, ...): shown ours instead
    # for the call, it decodes as asked and warns about no sampling flag.
    saved = model.generation_config
    model.generation_config = config
    try:
        with torch.inference_mode():
            for idx in batches:
                if sample:
                    torch.manual_seed(int(sample["seed"]))
                width = max(len(encoded[i]) for i in idx)  # left-padded to the longest
                rows = [[pad] * (width - len(encoded[i])) + encoded[i] for i in idx]
                mask = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx]
                x = torch.tensor(rows, dtype=torch.long, device=model.device)
                mask = torch.tensor(mask, dtype=torch.long, device=model.device)
                out = model.generate(input_ids=x, attention_mask=mask, generation_config=config)
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    ended = eos in new
                    out_ids[i] = (new[: new.index(eos)] if ended else new[:max_new_tokens], ended)
    finally:
        model.generation_config = saved
    return out_ids


def batched(encoded: list[list[int]], batch_size: int | None) -> list[list[int]]:
    """The prompts' indices in batches: of one token length each (no padding), or of up to `batch_size` sorted by
    length (the least padding)."""
    if batch_size is None:
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            groups.setdefault(len(ids), []).append(i)
        return [idx for _, idx in sorted(groups.items())]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def health(generations: list[tuple[list, bool]], n: int = 2) -> dict:
    """Per generation: `ends_with_eos` (1.0 when an EOS came within the limit), `length` (new tokens before it)
    and `distinct_<n>` (distinct token n-grams / n-grams: 1.0 is no repetition; 1.0 for fewer than n tokens)."""

    def distinct(ids):
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 1.0

    return {
        "ends_with_eos": [float(ended) for _, ended in generations],
        "length": [float(len(ids)) for ids, _ in generations],
        f"distinct_{n}": [distinct(ids) for ids, _ in generations],
    }
