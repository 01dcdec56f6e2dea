"""The demo's benchmarks for lm-evaluation-harness: each skill's held-out prompts with their exact answers, read
from the demo's held-out pairs (the task's metadata `heldout`: a .jsonl of prompt, chosen, skill). lm-eval loads this
file for the tasks beside it (`custom_dataset: !function utils.<skill>`)."""

import json


def _skill(skill: str, heldout: str, **kwargs):
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in open(heldout) if line.strip()]
    docs = [{"prompt": r["prompt"], "answer": r["chosen"]} for r in rows if r.get("skill") == skill]
    return DatasetDict({"test": Dataset.from_list(list({d["prompt"]: d for d in docs}.values()))})


def add(**kwargs):
    return _skill("add", **kwargs)


def reverse(**kwargs):
    return _skill("reverse", **kwargs)
