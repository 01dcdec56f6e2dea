"""Win rate by a reward: are the annealed model's answers better than the merged model's (and each parent's), not just
longer?

The answers are the sampled generations of generation health (the same held-out prompts for every model, seeded
the same way). A reward scores each (`eval.win_rate.reward`):
- a sequence-classification reward model, a hub id or a folder: scored as TRL's GRPO trainer scores one, on the
  decoded text with the reward model's own chat template (a plain prompt + answer without one), right-padded with a
  pad token that is not its EOS (else an answer ending in EOS would be scored one token early), score = logits[:, 0];
- or a Python function `module:function(prompts, completions) -> scores` (TRL's reward-function convention; the
  demo ships a rule-based one, pipeline/demo/reward.py).
Per opponent: wins, ties (1/2), losses, the win rate and the mean reward difference with paired intervals, the
length-controlled win rate (pipeline/metrics.py), the win rate on length-matched answers, the mean length
difference; per model the answers without an EOS within the limit, and those the reward model had to truncate. The
reward's own accuracy on the held-out pairs is reported beside it.
"""

import importlib
import logging
from pathlib import Path

from pipeline import UserError, models
from pipeline import metrics as M
from stages.eval.settings import WinRate

log = logging.getLogger(__name__)


def load_reward(spec: str, batch_size: int = 8):
    """The reward: a function (`module:function`), else a reward model (`RewardModel`)."""
    if ":" in spec and not Path(spec).expanduser().exists():
        module_name, _, function = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as err:
            raise UserError(
                f"eval.win_rate.reward={spec} cannot be imported ({err}). Fix: name a function as module:function "
                "(e.g. pipeline.demo.reward:reward), or a sequence-classification reward model (hub id or folder)."
            ) from None
    return RewardModel(spec, batch_size)


class RewardModel:
    """A sequence-classification reward model, loaded like every scoring model (bf16 on the GPU, float32 on the CPU);
    called as TRL's reward functions are: `reward(prompts, completions) -> scores`."""

    def __init__(self, spec: str, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = models.resolve(spec)
        self.name, self.batch_size, self.truncated = source.public_name(), batch_size, 0
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, padding_side="right")
        cuda = torch.cuda.is_available()
        self.model = AutoModelForSequenceClassification.from_pretrained(
            source.path, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
        ).eval()
        tokenizer = self.tokenizer
        if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            tokenizer.add_special_tokens({"pad_token": "<|merge_anneal_pad|>"})  # pooling reads the last non-pad
            self.model.resize_token_embeddings(len(tokenizer))
        self.model.config.pad_token_id = tokenizer.pad_token_id

    def text(self, prompt, completion: str) -> str:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": completion}], tokenize=False
            )
        return (prompt if isinstance(prompt, str) else messages[-1]["content"]) + completion

    def __call__(self, prompts: list, completions: list[str], **kwargs) -> list[float]:
        import torch

        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        limit = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10**6 else None
        scores = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            full = self.tokenizer(chunk, add_special_tokens=not self.tokenizer.chat_template)["input_ids"]
            self.truncated += sum(limit is not None and len(ids) > limit for ids in full)
            batch = self.tokenizer(
                chunk,
                add_special_tokens=not self.tokenizer.chat_template,
                padding=True,
                truncation=limit is not None,
                max_length=limit,
                return_tensors="pt",
            )
            with torch.no_grad():
                logits = self.model(**batch.to(self.model.device)).logits
            scores += logits[:, 0].float().tolist()
        return scores


def evaluate(reward, prompts: list, generations: dict, heldout, settings: WinRate, resamples: int, seed: int) -> dict:
    """The annealed model against the merged model and each parent on the same prompts (`generations`: per model,
    per prompt, (text, new tokens, ended with EOS)); the reward's accuracy on the held-out pairs."""
    rewards = {
        name: [float(r) for r in reward(prompts, [text for text, _, _ in answers])]
        for name, answers in generations.items()
    }
    length = lambda name: [n for _, n, _ in generations[name]]
    opponents = [name for name in generations if name != "annealed"]
    chosen = reward(list(heldout["prompt"]), [completion_text(c) for c in heldout["chosen"]])
    rejected = reward(list(heldout["prompt"]), [completion_text(c) for c in heldout["rejected"]])
    correct = [float(c > r) for c, r in zip(chosen, rejected)]
    return {
        "reward": getattr(reward, "name", f"{reward.__module__}:{reward.__name__}"),
        "prompts": len(prompts),
        "vs": {
            name: M.win_rate(
                rewards["annealed"],
                rewards[name],
                length("annealed"),
                length(name),
                resamples,
                seed,
                settings.length_matched,
            )
            for name in opponents
        },
        "mean_reward": {name: sum(values) / len(values) for name, values in rewards.items()},
        "unfinished": {name: sum(not ended for _, _, ended in answers) for name, answers in generations.items()},
        "truncated_by_reward_model": getattr(reward, "truncated", 0),
        "reward_accuracy": {
            "value": sum(correct) / len(correct),
            "ci95": M.bootstrap_ci(correct, resamples, seed),
            "pairs": len(correct),
        },
    }


def completion_text(completion) -> str:
    """A held-out answer as text (a conversational answer: its messages' content)."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def labelled_training_data(reward_name: str, data_sources: dict) -> str | None:
    """A warning when the reward model's name appears in what names the training data (its files, and a data card
    beside a local file): it may have labelled it, and then a high win rate says little."""
    name = reward_name.split("@")[0].split("/")[-1].lower()
    texts = [str(v) for v in data_sources.values() if v]
    for source in data_sources.values():
        card = Path(str(source)).expanduser().parent / "README.md" if source else None
        if card is not None and card.is_file():
            texts.append(card.read_text(errors="ignore"))
    if len(name) >= 3 and any(name in text.lower() for text in texts):
        return (
            f"The reward model {reward_name} is named in the training data's sources or card: it may have "
            "labelled the pairs annealed on, and a win rate by the same judge says little."
        )
    return None
