"""anneal.perf.pack_rows (stages/anneal/packing.py): a padded batch computed as fewer rows gives TRL the same per-token
log-probs and the same gradients, and a model that ignores packed position ids is caught at its first batch."""

import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from stages.anneal import packing


def test_plan_places_every_row_once_within_the_capacity():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        bins = packing.plan(lengths, max(lengths))
        assert sorted(r for b in bins for r in b) == list(range(len(lengths)))
        assert all(sum(lengths[r] for r in b) <= max(lengths) for b in bins)
        assert len(bins) <= len(lengths)
    assert packing.plan([10, 3, 7, 4, 6], 10) == [[0], [2, 1], [4, 3]]  # first fit, longest first


def batch(rows: int, width: int, vocab: int, seed: int):
    """Right-padded rows of mixed lengths, labels -100 on each row's prompt and padding (TRL's layout)."""
    rng = random.Random(seed)
    lengths = [rng.randint(2, width) for _ in range(rows)]
    lengths[0] = width
    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    for row, n in enumerate(lengths):
        labels[row, : rng.randint(1, n)] = -100  # the prompt
    return ids * mask, mask, labels


def test_the_reference_pass_order_and_the_rows_the_check_recomputes():
    order = packing.shortest_first([3, 9, 1, 9, 5])
    assert order == [2, 0, 4, 1, 3]  # shortest first, ties in their given order
    back = packing.inverse(order)
    assert [order[i] for i in back] == [0, 1, 2, 3, 4]  # taken in `order`, put back where they were
    assert packing.shared_rows([[0], [2, 1], [5], [4, 3, 6]]) == [1, 2, 3, 4, 6]  # rows packed beside another


def test_packed_log_probs_and_gradients_equal_the_padded_computation(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32)
    add_fused_lm_head(model)
    ids, mask, labels = batch(rows=12, width=40, vocab=model.config.vocab_size, seed=0)
    call = lambda: model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    trls = model.forward

    padded = call()
    padded.log_probs.sum(dim=1).pow(2).sum().backward()  # any loss of the per-row sums, as DPO's
    padded_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with packing.packed(model, True) as counts:
        ours = call()
        ours.log_probs.sum(dim=1).pow(2).sum().backward()
    assert counts["packed_rows"] < counts["rows"] == 12  # fewer rows computed
    assert ours.log_probs.shape == padded.log_probs.shape
    torch.testing.assert_close(ours.log_probs, padded.log_probs, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.log_probs == 0, padded.log_probs == 0)  # zero exactly where the label is masked
    for name, param in model.named_parameters():  # float rounding: other sums, other order
        scale = padded_grads[name].abs().max()
        assert (param.grad - padded_grads[name]).abs().max() <= 1e-5 * scale, name
    assert vars(model)["forward"] == trls  # TRL's forward is back


def test_a_model_that_ignores_packed_positions_is_computed_padded(tiny, caplog, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32)
    add_fused_lm_head(model)
    fused = model.forward

    def ignores_positions(*args, position_ids=None, **kwargs):  # attention across the packed sequences
        return fused(*args, **kwargs)

    model.forward = ignores_positions
    monkeypatch.setattr(packing, "CHECKED", {})  # not yet checked in this process
    ids, mask, labels = batch(rows=12, width=40, vocab=model.config.vocab_size, seed=1)
    with caplog.at_level(logging.WARNING), packing.packed(model, True) as counts:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    reference = fused(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs, reference.log_probs)
    assert counts["off"] and counts["packed_rows"] == counts["rows"]  # nothing saved
    assert caplog.text.count("does not follow packed position ids") == 1
    with packing.packed(model, True) as later:  # the same kind of model, later in the process: padded at once
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert later["off"] and later["packed_rows"] == later["rows"]


def test_the_check_tells_bf16_rounding_from_attention_across_sequences():
    # Rows of 25 predicted tokens summing to -20.0 packed. Under bf16 autocast SmolLM2-135M's padded shape rounded
    # rows up to 0.050 nats a token away, either way; attention across the packed sequences moved a row by at least
    # 0.29 a token there, 0.0018 on an untrained model in float32. A fixed 1e-2 on each sum took the first for the
    # second.
    packed = torch.zeros(4, 30)
    packed[:, :25] = -20.0 / 25
    rounded = torch.tensor([-20.52, -18.75, -20.0, -20.3])  # 0.021, 0.050, 0, 0.012 nats a token
    assert packing.difference_per_token(packed, rounded) <= packing.PER_TOKEN_TOLERANCE["bf16"]
    across = torch.tensor([-20.0, -27.3, -20.0, -20.0])  # one row 0.29 a token off
    assert packing.difference_per_token(packed, across) > packing.PER_TOKEN_TOLERANCE["bf16"]
    untrained = torch.tensor([-20.0, -20.045, -20.0, -20.0])  # 0.0018 a token: an untrained model, float32
    assert packing.difference_per_token(packed, untrained) > packing.PER_TOKEN_TOLERANCE["float32"]
    assert not torch.allclose(packed.sum(dim=1), rounded, rtol=1e-2, atol=1e-2)  # the old rule


@pytest.mark.parametrize("enabled", [True, False])
def test_calls_it_cannot_pack_pass_through(tiny, enabled):
    model = AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32)
    ids, mask, _ = batch(rows=4, width=16, vocab=model.config.vocab_size, seed=2)
    with packing.packed(model, enabled):  # no fused head: a plain forward, logits as ever
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (4, 16, model.config.vocab_size)
    assert "forward" not in vars(model)
