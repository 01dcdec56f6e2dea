"""Greedy generation of short answers (the demo's exact-match accuracy and the eval stage's samples).

Not part of the demo's cache key: changing how answers are generated never rebuilds the demo models.
"""

from __future__ import annotations


def greedy_answers(model, tokenizer, prompts, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to ``prompts``, in order: the decoded new tokens up to, not including, the first EOS.

    ``model.generate`` with a KV cache and plain argmax decoding (the checkpoint's own generation_config,
    sampling flags and logits processors included, is not used), stopping at the tokenizer's EOS. Prompts
    are encoded without special tokens and grouped by token length, so no batch needs padding.
    """
    import torch
    from transformers import GenerationConfig

    prompts = list(prompts)
    if max_new_tokens < 1:
        return [""] * len(prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True)
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {prompts[i]!r} encodes to no tokens")
        groups.setdefault(len(ids), []).append(i)

    answers = [""] * len(prompts)
    model.eval()
    # generate() fills every field left unset in the config it is given from the checkpoint's own
    # generation_config (its temperature, repetition penalty, suppressed tokens, ...): shown ours instead
    # for the call, it decodes by plain argmax and warns about no sampling flag.
    saved = model.generation_config
    model.generation_config = config
    try:
        with torch.inference_mode():
            for length, idx in sorted(groups.items()):
                x = torch.tensor([encoded[i] for i in idx], dtype=torch.long, device=model.device)
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
                for row, i in enumerate(idx):
                    new = out[row, length:].tolist()
                    if eos in new:
                        new = new[: new.index(eos)]
                    answers[i] = tokenizer.decode(new, skip_special_tokens=False)
    finally:
        model.generation_config = saved
    return answers
