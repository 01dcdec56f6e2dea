"""The win rate (stages/eval/win_rate.py, pipeline/metrics.py): a tiny local reward model whose score is known in
closed form, and the statistics on synthetic data whose answer is known."""

import numpy as np
import pytest
import torch

from conftest import llama_settings
from pipeline import UserError
from pipeline import metrics as M
from pipeline.demo.build import build_tokenizer
from stages.eval import win_rate

HIDDEN, EPS = 128, 1e-6


def uniform_attention_reward_model(folder, pad_is_eos: bool):
    """A one-layer sequence-classification Llama whose score is known in closed form: one-hot embeddings, queries
    and keys zero (every position attends evenly to itself and all before it), values and output identity, the MLP
    silent. At the last token t of n, the residual is h = e_t + r * mean(e_s, s <= t) with r = 1 / sqrt(1/H + eps)
    (the input norm of a one-hot row), and the score is w . h / sqrt(mean(h^2) + eps)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        **llama_settings(tokenizer, hidden_size=HIDDEN, num_hidden_layers=1, rms_norm_eps=EPS, num_labels=1)
    )
    model = LlamaForSequenceClassification(config)
    w = torch.Generator().manual_seed(0)
    weights = torch.randn(1, HIDDEN, generator=w)
    layer = model.model.layers[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(tokenizer), HIDDEN))
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.k_proj.weight.zero_()
        layer.self_attn.v_proj.weight.copy_(torch.eye(HIDDEN))
        layer.self_attn.o_proj.weight.copy_(torch.eye(HIDDEN))
        layer.mlp.down_proj.weight.zero_()
        model.score.weight.copy_(weights)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return weights[0].double().numpy(), tokenizer


def closed_form(ids: list[int], weights: np.ndarray) -> float:
    one_hot = np.eye(len(weights))[: max(ids) + 1] if max(ids) < len(weights) else None
    assert one_hot is not None
    r = 1 / np.sqrt(1 / HIDDEN + EPS)
    h = one_hot[ids[-1]] + r * one_hot[ids].mean(0)
    return float(weights @ (h / np.sqrt((h**2).mean() + EPS)))


PROMPTS = ["12+34=", "rev abc=", "5+5=", "rev quokka=", "99+1=", "rev a="]
COMPLETIONS = ["46", "cba", "10 and a longer tail", "akkouq", "", "a"]


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["own-pad", "pad-is-eos"])
def test_a_reward_model_scores_as_its_closed_form_batched_or_one_at_a_time(tmp_path, pad_is_eos):
    """Scored on the reward model's own chat template (the demo tokenizer's ends an answer with EOS), right-padded;
    a tokenizer whose pad token is its EOS gets a pad token of its own, else the score would be read one token
    early (at the answer's last character instead of its EOS)."""
    weights, tokenizer = uniform_attention_reward_model(tmp_path / "rm", pad_is_eos)
    one = win_rate.RewardModel(str(tmp_path / "rm"), batch_size=1)
    batched = win_rate.RewardModel(str(tmp_path / "rm"), batch_size=4)
    assert one.tokenizer.pad_token_id != one.tokenizer.eos_token_id
    assert one.tokenizer.padding_side == "right"
    expected = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id
        expected.append(closed_form(ids, weights))
    scores = one(PROMPTS, COMPLETIONS)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert batched(PROMPTS, COMPLETIONS) == pytest.approx(scores, abs=1e-5)
    assert len(set(np.round(expected, 3))) == len(expected)  # the scores tell the answers apart
    assert one.truncated == 0 and one.name == "rm"


def test_a_reward_function_is_imported_and_a_bad_one_refused():
    reward = win_rate.load_reward("pipeline.demo.reward:reward")
    assert reward(["12+34=", "rev abc=", "12+34="], ["46", "cba", "46 and more"]) == [1.0, 1.0, 0.0]
    with pytest.raises(UserError, match="module:function"):
        win_rate.load_reward("pipeline.demo.reward:nothing_here")


def test_the_judge_that_labelled_the_data_is_named(tmp_path):
    data = tmp_path / "prefs" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("")
    assert win_rate.labelled_training_data("OpenAssistant/reward-model-deberta", {"train": str(data)}) is None
    (data.parent / "README.md").write_text("Pairs ranked by reward-model-deberta.")
    warning = win_rate.labelled_training_data("OpenAssistant/reward-model-deberta", {"train": str(data)})
    assert "may have labelled" in warning


# ------------------------------------------------------------------------------------------- statistics


def synthetic(n=1000, seed=0, edge=0.0):
    """Answers of A and B with lengths drawn so that A is longer on average; the reward is the length plus noise,
    plus `edge` for A (a better answer at equal length)."""
    rng = np.random.default_rng(seed)
    la, lb = rng.integers(20, 61, n), rng.integers(10, 51, n)
    return la + edge + rng.normal(0, 3, n), lb + rng.normal(0, 3, n), la, lb


def test_winning_only_by_length_is_not_better():
    a, b, la, lb = synthetic()
    w = M.win_rate(a, b, la, lb, 300, 0)
    assert w["win_rate_ci95"][0] > 0.6  # raw: A wins because it is longer
    assert w["length_controlled_ci95"][0] < 0.5 < w["length_controlled_ci95"][1]
    assert w["length_controlled"] == pytest.approx(0.5, abs=0.05)
    assert w["length_matched"]["n"] > 50 and w["length_matched"]["win_rate"] == pytest.approx(0.5, abs=0.1)
    assert w["length_delta"] == pytest.approx(float(np.mean(la - lb)))
    better = M.win_rate(*synthetic(edge=3.0), 300, 0)  # better at equal length: length control keeps it
    assert better["length_controlled_ci95"][0] > 0.6 and better["length_matched"]["win_rate"] > 0.6


def test_swapping_the_models_turns_w_into_one_minus_w():
    a, b, la, lb = synthetic(n=400, seed=1, edge=1.0)
    w, swapped = M.win_rate(a, b, la, lb, 300, 0), M.win_rate(b, a, lb, la, 300, 0)
    for key in ("win_rate", "length_controlled"):
        assert swapped[key] == pytest.approx(1 - w[key], abs=1e-6)
        assert swapped[f"{key}_ci95"] == pytest.approx([1 - w[f"{key}_ci95"][1], 1 - w[f"{key}_ci95"][0]], abs=1e-6)
    assert (swapped["wins"], swapped["losses"]) == (w["losses"], w["wins"])
    assert swapped["reward_delta"] == pytest.approx(-w["reward_delta"])


def test_ties_count_half_and_a_clean_sweep_does_not_break_the_fit():
    lengths = np.arange(40)
    tied = M.win_rate(np.ones(40), np.ones(40), lengths, lengths[::-1], 200, 0)
    assert (tied["ties"], tied["win_rate"], tied["length_controlled"]) == (40, 0.5, pytest.approx(0.5))
    mixed = M.win_rate([1, 1, 0, 2], [1, 0, 1, 2], [3, 3, 3, 3], [3, 3, 3, 3], 200, 0)
    assert (mixed["wins"], mixed["ties"], mixed["losses"], mixed["win_rate"]) == (1, 2, 1, 0.5)
    sweep = M.win_rate(np.ones(40), np.zeros(40), lengths, lengths[::-1], 200, 0)
    assert sweep["win_rate"] == 1.0 and sweep["win_rate_ci95"] == [1.0, 1.0]
    assert np.isfinite(sweep["length_controlled_ci95"]).all() and sweep["length_controlled"] > 0.95
    intercept, slope = M.logistic_fit([-1.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    assert np.isfinite([intercept, slope]).all() and intercept > 0
