"""Scoring models on text, shared by the anneal stage's merge gate and the eval stage. As lm-eval's `LM` interface
keeps scoring apart from tasks and reports (`loglikelihood`, `generate_until`), this module knows models and tokens,
not metrics files:

- `load_model`, `load_tokenizer`: the one loader (bf16 spread over the CUDA GPUs where there are any, float32 on
  the CPU);
- `tokenize_completion` (TRL's DPO tokenisation: the completion after the shared prefix of prompt and
  prompt + completion, EOS for plain text, truncated as TRL truncates), `tokenize_pairs` (every pair's chosen and
  rejected answer so), `tokenize_text` (a corpus text);
- `score`: batched no-grad forwards over right-padded sequences, per sequence the summed and mean log-prob of its
  masked tokens, their count, and the mean per-token KL to a reference; `chosen_preferred`: per pair, whether a
  model gives its chosen answer the higher summed log-prob;
- generation: `generate` (greedy or seeded sampling), `greedy_answers`, `health`, from `pipeline.generation` (its
  own module because the demo's build uses it too, and the demo's cache key reads none of it).

Heavy libraries are imported inside the functions.
"""

from pathlib import Path

from pipeline import metrics as M
from pipeline.generation import generate, greedy_answers, health  # noqa: F401  (scoring's generation half)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(folder: str | Path):
    """The one loader for scoring and generating: bf16 where CUDA GPUs are, spread over them (accelerate's
    device_map="auto") where one cannot hold a real checkpoint alone; float32 on the CPU. In eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
    ).eval()


def truncation_mode(mode: str | None) -> str:
    """The anneal's truncation mode: its own setting, else DPOConfig's default."""
    from trl import DPOConfig

    return mode or DPOConfig.__dataclass_fields__["truncation_mode"].default


def spread(items: list, n: int) -> list:
    """At most `n` of `items`, evenly spread over them."""
    return items[:: max(1, len(items) // n)][:n]


def prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, list):  # conversational
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def tokenize_completion(tokenizer, prompt, completion, max_length, truncation_mode: str):
    """(input_ids, completion mask) as TRL's DPOTrainer builds them: prompt + completion (+ EOS for plain
    text), the completion starting where the tokenised prompt and prompt+completion diverge, truncated."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    else:
        eos = tokenizer.eos_token
        completion = completion if completion.endswith(eos) else completion + eos
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full_ids = tokenizer(text=prompt + completion)["input_ids"]
    start = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids))
    )
    mask = [0] * start + [1] * (len(full_ids) - start)
    if max_length is not None:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        full_ids, mask = full_ids[cut], mask[cut]
    return full_ids, mask


def tokenize_pairs(tokenizer, rows, max_length, truncation_mode: str) -> dict[str, list]:
    """`{"chosen": [...], "rejected": [...]}`: each pair's answers tokenised as `tokenize_completion` does."""
    return {
        answer: [tokenize_completion(tokenizer, r["prompt"], r[answer], max_length, truncation_mode) for r in rows]
        for answer in ("chosen", "rejected")
    }


def tokenize_text(tokenizer, text: str, max_length):
    """A corpus text: every token after the first counts (the first has no context to be predicted from)."""
    ids = tokenizer(text=text)["input_ids"][:max_length]
    return ids, [0] + [1] * (len(ids) - 1)


def batches(sequences, batch_size: int, pad_id: int):
    """Right-padded (input_ids, attention_mask, loss mask) tensors, `batch_size` sequences at a time."""
    import torch

    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        loss_mask = torch.zeros((len(chunk), width), dtype=torch.float32)
        for row, (seq, mask) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            loss_mask[row, : len(seq)] = torch.tensor(mask, dtype=torch.float32)
        yield ids, attention, loss_mask


def chosen_preferred(model_dir, rows, max_length, truncation_mode: str, batch_size: int):
    """Per pair of `rows` (prompt, chosen, rejected), whether the model at `model_dir` gives the chosen answer the
    higher summed log-prob (a bool tensor); the model is freed before this returns."""
    import torch

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    pad_id = tokenizer.pad_token_id or 0
    with torch.no_grad():
        logps = {
            answer: score(model, sequences, batch_size, pad_id)["logps"]
            for answer, sequences in tokenize_pairs(tokenizer, rows, max_length, truncation_mode).items()
        }
    del model
    return logps["chosen"] > logps["rejected"]


def score(model, sequences, batch_size: int, pad_id: int, reference=None) -> dict:
    """Per sequence: summed and mean log-prob of the masked tokens, their count, and (with a reference)
    the mean per-token KL(model || reference) over them. One forward per batch."""
    import torch

    out = {"logps": [], "mean_logps": [], "tokens": [], "kl": []}
    for batch in batches(sequences, batch_size, pad_id):
        ids, attention, loss_mask = (t.to(model.device) for t in batch)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        labels, mask = ids[:, 1:], loss_mask[:, 1:]
        per_token = M.token_logps(logits, labels)
        out["logps"].append(M.sequence_logps(per_token, mask))
        out["mean_logps"].append(M.mean_logps(per_token, mask))
        out["tokens"].append(mask.sum(-1))
        if reference is not None:
            reference_logits = reference(input_ids=ids, attention_mask=attention).logits[:, :-1]
            out["kl"].append(M.masked_mean(M.per_token_kl(logits, reference_logits), mask))
    return {key: torch.cat(parts) for key, parts in out.items() if parts}
