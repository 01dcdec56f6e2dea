"""Small pure metric functions for the eval stage: log-probs, KL, perplexity, preference and DPO reward
accuracy, and (paired) bootstrap intervals. Tensors in, tensors or floats out; no models, no files.

Conventions: `logits` are (batch, positions, vocab) already aligned with `labels` (batch, positions), i.e.
the caller has shifted them (`logits[:, :-1]` predicts `input_ids[:, 1:]`); `mask` is 1 on the tokens
that count (the completion, or every text token after the first) and 0 on prompt and padding.
"""

import math

import numpy as np
import torch


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at every position: (batch, positions)."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    return logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the masked per-token log-probs of each sequence: log p(completion | prompt)."""
    return (per_token * mask).sum(-1)


def mean_logps(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token mean of the masked log-probs of each sequence (length-normalised log-prob)."""
    return sequence_logps(per_token, mask) / mask.sum(-1).clamp(min=1)


def per_token_kl(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(model || reference) of the next-token distributions at every position: (batch, positions)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(reference_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the masked positions of each sequence: (batch,)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / total tokens): the corpus-level perplexity."""
    return math.exp(nll_sum / n_tokens)


def preference_correct(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1.0 where the chosen completion scores strictly higher than the rejected one, else 0.0."""
    return (torch.as_tensor(chosen) > torch.as_tensor(rejected)).float()


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    return preference_correct(chosen, rejected).mean().item()


def implicit_rewards(logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r = beta * (log p_model - log p_reference)."""
    return beta * (torch.as_tensor(logps) - torch.as_tensor(reference_logps))


def reward_margins(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> torch.Tensor:
    """r_chosen - r_rejected per pair."""
    return implicit_rewards(chosen_logps, ref_chosen_logps, beta) - implicit_rewards(
        rejected_logps, ref_rejected_logps, beta
    )


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(stats: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_ci(values, resamples: int, seed: int, weights=None, confidence: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the (weighted) mean of per-item `values`, seeded."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = _resample_indices(len(values), resamples, seed)
    stats = (values[idx] * weights[idx]).sum(1) / weights[idx].sum(1)
    return _percentiles(stats, confidence)


def paired_bootstrap(a, b, resamples: int, seed: int, confidence: float = 0.95) -> dict:
    """Mean of (a - b) over the same items, with a percentile interval from resampling items (pairs kept)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    diff = a - b
    idx = _resample_indices(len(diff), resamples, seed)
    return {"delta": float(diff.mean()), "ci95": _percentiles(diff[idx].mean(1), confidence)}


def paired_bootstrap_perplexity(nll_a, nll_b, tokens, resamples: int, seed: int, confidence: float = 0.95) -> dict:
    """Corpus perplexity of a minus that of b on the same texts (`nll_*`: summed NLL per text, `tokens`: scored
    tokens per text), with percentile intervals from resampling texts; also the ratio a / b and its interval."""
    nll_a, nll_b, tokens = (np.asarray(x, dtype=np.float64) for x in (nll_a, nll_b, tokens))
    idx = _resample_indices(len(tokens), resamples, seed)
    ppl = lambda nll, i: np.exp(nll[i].sum(-1) / tokens[i].sum(-1))
    whole = np.arange(len(tokens))
    a, b = ppl(nll_a, idx), ppl(nll_b, idx)
    return {
        "delta": float(ppl(nll_a, whole) - ppl(nll_b, whole)),
        "ci95": _percentiles(a - b, confidence),
        "ratio": float(ppl(nll_a, whole) / ppl(nll_b, whole)),
        "ratio_ci95": _percentiles(a / b, confidence),
    }


def retention(model: dict, parents: dict, own: dict, resamples: int, seed: int, confidence: float = 0.95):
    """How much of each parent's own skill a model keeps: retention = model's accuracy / the parent's on that
    skill's items (`model[skill]`, `parents[parent][skill]`: per-item 0/1 over the same items; `own`: parent ->
    its skill), with a paired percentile interval (items resampled, the same draw for model and parent); and the
    worst over the parents, its interval from the per-resample minimum. A parent at 0 on its own skill has no
    retention (None). Returns ({parent: value, "worst": value}, {parent: [lo, hi], "worst": [lo, hi]})."""
    values, intervals, draws = {}, {}, []
    for k, (parent, skill) in enumerate(sorted(own.items())):
        a, b = (np.asarray(x[skill], dtype=np.float64) for x in (model, parents[parent]))
        if b.mean() == 0:
            values[parent], intervals[parent] = None, None
            continue
        idx = _resample_indices(len(a), resamples, seed + k)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats = a[idx].mean(1) / b[idx].mean(1)
        stats = np.where(np.isfinite(stats), stats, np.nan)  # a resample where the parent scored 0
        values[parent], intervals[parent] = float(a.mean() / b.mean()), _nan_percentiles(stats, confidence)
        draws.append(stats)
    if draws:
        values["worst"] = min(v for v in values.values() if v is not None)
        intervals["worst"] = _nan_percentiles(np.min(np.stack(draws), axis=0), confidence)
    return values, intervals


def _nan_percentiles(stats: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.nanpercentile(stats, [tail, 100 - tail])
    return [float(lo), float(hi)]
