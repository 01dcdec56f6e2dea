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


def retention(model: dict, parents: dict, chance: dict, resamples: int, seed: int, confidence: float = 0.95):
    """How much of each parent's own skill a model keeps, chance-corrected: (model - chance) / (parent - chance)
    over the items of that parent's own tasks (`model[p]`, `parents[p]`, `chance[p]`: per-item values over the same
    items, per parent p), with a paired percentile interval (items resampled, the same draw for model and parent);
    and the worst over the parents, its interval from the per-resample minimum. A parent not above chance on its
    own items has no retention (None). Returns ({parent: value, "worst": value}, {parent: [lo, hi], "worst": ...})."""
    values, intervals, draws = {}, {}, []
    for k, parent in enumerate(sorted(parents)):
        a, b, c = (np.asarray(x[parent], dtype=np.float64) for x in (model, parents, chance))
        if b.mean() <= c.mean():
            values[parent], intervals[parent] = None, None
            continue
        idx = _resample_indices(len(a), resamples, seed + k)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats = (a[idx].mean(1) - c[idx].mean(1)) / (b[idx].mean(1) - c[idx].mean(1))
        stats = np.where(np.isfinite(stats) & (b[idx].mean(1) > c[idx].mean(1)), stats, np.nan)
        values[parent] = float((a.mean() - c.mean()) / (b.mean() - c.mean()))
        intervals[parent] = _nan_percentiles(stats, confidence)
        draws.append(stats)
    if draws:
        values["worst"] = min(v for v in values.values() if v is not None)
        intervals["worst"] = _nan_percentiles(np.min(np.stack(draws), axis=0), confidence)
    return values, intervals


def soft_preferences(a, b) -> np.ndarray:
    """Per item, 1 where `a` scores higher, 0 where lower, 1/2 for a tie."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def logistic_fit(x, y, ridge: float = 1e-2, steps: int = 50) -> tuple[float, float]:
    """(intercept, slope) of a logistic regression of soft labels `y` in [0, 1] on `x` (Newton's method on the
    cross-entropy, a small ridge penalty on both coefficients so that a clean sweep, all 1s, stays finite)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-design @ beta))
        gradient = design.T @ (p - y) + ridge * beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def length_controlled_win_rate(preferences, length_delta) -> float:
    """AlpacaEval's length control without its baselines: the soft preference fitted against
    tanh(length delta / its standard deviation), read at zero length difference."""
    delta = np.asarray(length_delta, dtype=np.float64)
    scale = delta.std() or 1.0
    intercept, _ = logistic_fit(np.tanh(delta / scale), preferences)
    return float(1 / (1 + np.exp(-intercept)))


def win_rate(
    a, b, length_a, length_b, resamples: int, seed: int, matched: float = 0.1, confidence: float = 0.95
) -> dict:
    """Model A against model B, item by item (the same prompts): wins, ties (1/2), losses; the win rate and the
    mean reward difference with paired percentile intervals; the length-controlled win rate (its interval by
    refitting on each resample); the win rate on the length-matched items (lengths within `matched` of each other,
    relative); the mean length difference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    la, lb = np.asarray(length_a, dtype=np.float64), np.asarray(length_b, dtype=np.float64)
    soft, delta = soft_preferences(a, b), la - lb
    idx = _resample_indices(len(a), resamples, seed)
    controlled = [length_controlled_win_rate(soft[i], delta[i]) for i in idx]
    close = np.abs(delta) <= matched * np.maximum(np.maximum(la, lb), 1)
    return {
        "n": int(len(a)),
        "wins": int((a > b).sum()),
        "ties": int((a == b).sum()),
        "losses": int((a < b).sum()),
        "win_rate": float(soft.mean()),
        "win_rate_ci95": _percentiles(soft[idx].mean(1), confidence),
        "reward_delta": float((a - b).mean()),
        "reward_delta_ci95": _percentiles((a - b)[idx].mean(1), confidence),
        "length_controlled": length_controlled_win_rate(soft, delta),
        "length_controlled_ci95": _percentiles(np.asarray(controlled), confidence),
        "length_matched": {"n": int(close.sum()), "win_rate": float(soft[close].mean()) if close.any() else None},
        "length_delta": float(delta.mean()),
    }


def _nan_percentiles(stats: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.nanpercentile(stats, [tail, 100 - tail])
    return [float(lo), float(hi)]
