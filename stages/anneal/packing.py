"""Packing: a padded batch computed as fewer rows, each sequence attending only to itself.

TRL's DPO pads every row of a batch (the chosen and the rejected answer of every pair, each after its prompt) to
the longest one; on real data most of a batch can be padding. `packed(model)` wraps the forward TRL gives the
model (its fused LM head: `model(input_ids, attention_mask, labels, fused_lm_head=True)` returns per-token
log-probs) so that a batch's rows are placed first-fit into as few rows of the batch's length as hold them.
Position ids restart at every sequence, and transformers builds the block-causal mask from them (masking_utils,
`find_packed_sequence_indices`); a sequence's first label is masked, as it would be predicted from the sequence
before it; the per-token outputs go back to the padded layout. TRL then reads the same numbers, up to float
rounding, that it would have computed with the padding.

The first packed batch of a model class (and attention implementation) in a process has its rows that were packed
beside another computed unpacked too, once, without gradients (at most a batch, whatever the data): where the two
disagree (a model whose attention ignores packed position ids), packing stays off for it, with a warning.

The reference pass (stages/anneal/trainers.py: ScoringTrainer) also meets its pairs shortest first, so a batch holds
pairs of about one length and packs with about the padding of training's batches (a batch in the given order pads
to its one long pair); the stored log-probs go back to the pairs' order. Shortest first, because several processes
even out their last batch with the first pairs again: short ones, which never widen the last (longest) batch, so
every rank scores the batches one process would and the store is the same.
"""

import contextlib
import logging

log = logging.getLogger(__name__)

PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's fused-head fields
CHECKED: dict = {}  # (model class, attention implementation) -> packing gave the padded numbers (this process)
# The check's limit on a row's log-prob difference per predicted token, in float32 and under bf16 autocast. Float32
# agrees to ~1e-7, where attention across the packed sequences (position ids ignored) moved each row after the first
# of a packed row by 0.0018-0.0085 nats a token on an untrained 2-layer Llama, 1.1-6.8 on the demo's model and
# 0.29-1.9 on SmolLM2-135M-Instruct (12 rows of random tokens). bf16 autocast rounds two shapes of one computation
# differently: on SmolLM2-135M-Instruct (30 layers) and its 42-layer depth up-scaled merge, short rows moved up to
# 0.050 nats a token (a fixed 1e-2 on each row's sum had switched packing off for them).
PER_TOKEN_TOLERANCE = {"float32": 1e-4, "bf16": 0.1}


def plan(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: row indices into bins of at most `capacity` tokens each, longest rows first."""
    bins, free = [], []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, space in enumerate(free):
            if lengths[row] <= space:
                bins[b].append(row)
                free[b] -= lengths[row]
                break
        else:
            bins.append([row])
            free.append(capacity - lengths[row])
    return bins


def shortest_first(lengths: list[int]) -> list[int]:
    """Row indices by length, shortest first (ties in their given order): batches of rows of about one length."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def inverse(order: list[int]) -> list[int]:
    """The permutation that puts rows taken in `order` back where they were."""
    back = [0] * len(order)
    for position, row in enumerate(order):
        back[row] = position
    return back


def layout(lengths: list[int], capacity: int):
    """Where every token goes. Returns (bins, token source and destination as flat indices into the padded
    [rows, capacity] and packed [bins, capacity] grids, the packed position ids as a nested list, the flat packed
    indices of each sequence's first token, and the moves of the shifted per-token outputs, [rows, capacity - 1]
    from [bins, capacity - 1])."""
    bins = plan(lengths, capacity)
    source, target, starts, out_source, out_target = [], [], [], [], []
    positions = []
    for b, rows in enumerate(bins):
        offset, row_positions = 0, []
        for row in rows:
            n = lengths[row]
            source += range(row * capacity, row * capacity + n)
            target += range(b * capacity + offset, b * capacity + offset + n)
            starts.append(b * capacity + offset)
            out_source += range(b * (capacity - 1) + offset, b * (capacity - 1) + offset + max(n - 1, 0))
            out_target += range(row * (capacity - 1), row * (capacity - 1) + max(n - 1, 0))
            row_positions += range(n)
            offset += n
        positions.append(row_positions + list(range(capacity - offset)))  # trailing padding: a sequence of its own
    return bins, source, target, positions, starts, out_source, out_target


@contextlib.contextmanager
def packed(model, enabled: bool):
    """While active, `model`'s forward packs the rows of every fused-LM-head call with right-padded rows. Yields
    counts over those calls (rows and positions as TRL padded them, and as computed), or None when not enabled."""
    if not enabled:
        yield None
        return
    had_own = "forward" in vars(model)
    forward = model.forward
    kind = (type(model).__qualname__, getattr(getattr(model, "config", None), "_attn_implementation", None))
    model.forward = PackedForward(forward, kind, type(model).__name__)
    try:
        yield model.forward.counts
    finally:
        if had_own:
            model.forward = forward
        else:
            del model.forward


class PackedForward:
    """A model's forward that packs each packable batch (`packed`); `counts` tallies rows and positions, padded as
    TRL built them and as computed (`off`: packing found not to hold for this model class)."""

    def __init__(self, forward, kind: tuple, name: str):
        self.forward, self.kind, self.name = forward, kind, name
        self.counts = {
            "rows": 0,
            "packed_rows": 0,
            "positions": 0,
            "packed_positions": 0,
            "off": CHECKED.get(kind) is False,
        }

    def __call__(self, *args, **kwargs):
        import torch

        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        if (
            args
            or self.counts["off"]
            or not kwargs.get("fused_lm_head")
            or ids is None
            or mask is None
            or labels is None
            or kwargs.get("position_ids") is not None
            or kwargs.get("shift_labels") is not None
        ):
            return self.forward(*args, **kwargs)
        rows, width = ids.shape
        lengths = mask.sum(dim=1)
        right_padded = torch.equal(mask.bool(), torch.arange(width, device=mask.device) < lengths[:, None])
        placed = layout(lengths.tolist(), width)
        if not right_padded or len(placed[0]) >= rows:
            self.tally(rows, rows, width)
            return self.forward(*args, **kwargs)
        out = self.forward_packed(kwargs, placed, rows, width)
        if self.kind not in CHECKED and not self.check(out, kwargs, shared_rows(placed[0]), lengths):
            self.tally(rows, rows, width)
            return self.forward(*args, **kwargs)
        self.tally(rows, len(placed[0]), width)
        return out

    def forward_packed(self, kwargs: dict, placed: tuple, rows: int, width: int):
        """One forward of the packed rows (`placed`: `layout`'s), its per-token outputs back in the padded layout."""
        import torch

        bins, source, target, positions, starts, out_source, out_target = placed
        ids, labels = kwargs["input_ids"], kwargs["labels"]
        index = lambda values: torch.tensor(values, dtype=torch.long, device=ids.device)
        source, target, starts = index(source), index(target), index(starts)
        packed_ids = ids.new_zeros(len(bins) * width).index_copy_(0, target, ids.reshape(-1)[source])
        packed_labels = labels.new_full((len(bins) * width,), -100).index_copy_(0, target, labels.reshape(-1)[source])
        packed_labels[starts] = -100  # a sequence's first token is not predicted from the one packed before it
        out = self.forward(
            **{
                **kwargs,
                "input_ids": packed_ids.view(len(bins), width),
                "attention_mask": None,
                "labels": packed_labels.view(len(bins), width),
                "position_ids": index(positions),
            }
        )
        moves = (index(out_source), index(out_target))
        for name in PER_TOKEN:
            value = getattr(out, name, None)
            if value is not None:
                out[name] = unpack(value, moves, rows, width - 1)
        return out

    def check(self, out, kwargs: dict, rows: list[int], lengths) -> bool:
        """The first packed batch of this model class: its rows that share a packed row with another (`rows`, the
        only ones packing could get wrong) computed padded too, without gradients, at their own width; whether the
        two agree. Its cost is at most one batch's, however large the data. Where they disagree, packing stays off
        for the class, with a warning."""
        import torch

        width = int(lengths[rows].max())
        batch, index = kwargs["input_ids"].shape, torch.tensor(rows, device=lengths.device)
        alone = {  # the bin's rows, trimmed to their longest (right padding: only padding is cut)
            key: value.index_select(0, index)[:, :width]
            if torch.is_tensor(value) and value.dim() == 2 and tuple(value.shape) == tuple(batch)
            else value
            for key, value in kwargs.items()
        }
        with torch.no_grad():
            padded = self.forward(**alone).log_probs.sum(dim=1)
        per_token = difference_per_token(out.log_probs.detach().index_select(0, index), padded)
        precision = "bf16" if torch.is_autocast_enabled(lengths.device.type) else "float32"
        CHECKED[self.kind] = per_token <= PER_TOKEN_TOLERANCE[precision]
        if not CHECKED[self.kind]:
            self.counts["off"] = True
            log.warning(
                f"anneal: packed rows gave other log-probs than padded ones for {self.name} ({per_token:.3g} nats "
                f"a token in {precision}): its attention does not follow packed position ids, so batches are computed "
                "padded (anneal.perf.pack_rows)"
            )
        return CHECKED[self.kind]

    def tally(self, rows: int, computed_rows: int, width: int) -> None:
        self.counts["rows"] += rows
        self.counts["positions"] += rows * width
        self.counts["packed_rows"] += computed_rows
        self.counts["packed_positions"] += computed_rows * width


def difference_per_token(packed, padded_sums) -> float:
    """The largest difference between a row's summed log-probs packed (per token, masked labels exactly 0) and padded
    (`padded_sums`), per predicted token of the row."""
    tokens = (packed != 0).sum(dim=1).clamp(min=1)
    return ((packed.sum(dim=1) - padded_sums).abs() / tokens).max().item()


def shared_rows(bins: list[list[int]]) -> list[int]:
    """The rows packed beside another one (bins of two or more rows), in order."""
    return sorted(row for rows in bins if len(rows) > 1 for row in rows)


def unpack(value, moves, rows: int, width: int):
    """Per-token outputs moved from the packed grid back to the padded one (`moves`: source, target indices)."""
    source, target = moves
    flat = value.new_zeros(rows * width)
    return flat.index_copy(0, target, value.reshape(-1).index_select(0, source)).view(rows, width)
