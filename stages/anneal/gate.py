"""Is the merge fit to anneal? A merge can come out broken with every tensor in place and finite (extreme weights, a
passthrough stacking layers out of order, mismatched tokenizers). Before the reference pass, the gate scores a
spread of held-out chosen answers with the merged model and with every parent, the way eval does (TRL's
tokenisation, pipeline/scoring.py), and refuses a merge whose perplexity is far above every parent's
(`pipeline.merge_check`).
"""

import logging
from pathlib import Path

from pipeline import UserError, models, records, scoring
from pipeline.metrics import perplexity
from stages.anneal.settings import MergeCheck

log = logging.getLogger(__name__)


def perplexity_gate(
    check: MergeCheck, heldout, merge: records.MergeRecord, trainer: dict, batch_size: int
) -> dict | None:
    """Perplexity on up to `check.texts` of the `heldout` pairs' chosen answers (tokenised as the anneal's
    `trainer` settings truncate them; `batch_size` sequences a forward, eval's), of the merged model and of each
    parent sharing its vocabulary; a merge above `check.max_perplexity_ratio` times the highest parent's is refused
    (None: recorded only). None when the check is off (texts 0)."""
    if not check.texts:
        return None
    merged_dir = Path(merge.outputs.model)
    rows = heldout.select(scoring.spread(list(range(len(heldout))), check.texts))
    tokenizer = scoring.load_tokenizer(merged_dir)
    truncation = scoring.truncation_mode(trainer.get("truncation_mode"))
    texts = [
        scoring.tokenize_completion(tokenizer, r["prompt"], r["chosen"], trainer["max_length"], truncation)
        for r in rows
    ]
    texts = [(ids, mask) for ids, mask in texts if any(mask)]  # an answer the length limit left nothing of: none
    if not texts:  # the anneal refuses such data itself, with its counts
        log.warning("anneal: no merge check: no held-out answer fits anneal.trainer.max_length")
        return None
    found = perplexities(merged_dir, merge.inputs.parents, tokenizer, texts, batch_size)
    return verdict(check, found, len(texts), merged_dir)


def perplexities(merged_dir: Path, parents: list[str], tokenizer, texts, batch_size: int) -> dict[str, float]:
    """The merged model's perplexity on `texts`, and each parent's that shares its vocabulary (`parent:<name>`)."""
    import torch

    candidates = {"merged": merged_dir, **{f"parent:{Path(p).name}": Path(p) for p in parents}}
    found = {}
    for name, folder in candidates.items():
        if name != "merged":
            try:
                models.check_same_vocabulary(tokenizer, merged_dir, folder, f"Parent {name}", "")
            except UserError:  # its scores on the merged model's token ids would mean nothing
                log.info(f"anneal: merge check leaves out {name} (another vocabulary)")
                continue
        model = scoring.load_model(folder)
        with torch.no_grad():
            scored = scoring.score(model, texts, batch_size, tokenizer.pad_token_id or 0)
        found[name] = perplexity(float(-scored["logps"].sum()), int(scored["tokens"].sum()))
        del model
        models.release_memory()
    return found


def verdict(check: MergeCheck, found: dict[str, float], texts: int, merged_dir: Path) -> dict:
    """The gate's record; a merge above the limit is refused, naming its numbers and the fixes."""
    parents = {name: value for name, value in found.items() if name != "merged"}
    highest = max(parents.values(), default=None)
    ratio = found["merged"] / highest if highest else None
    limit = check.max_perplexity_ratio
    result = {
        "texts": texts,
        "perplexity": found,
        "ratio": ratio,
        "max_ratio": limit,
        "flagged": bool(limit is not None and ratio is not None and ratio > limit),
    }
    listing = ", ".join(f"{name.removeprefix('parent:')} {value:.4g}" for name, value in parents.items())
    log.info(
        f"anneal: merge check on {texts} held-out chosen answers: perplexity merged {found['merged']:.4g}, "
        f"parents {listing or 'none comparable'}"
        + (
            f" ({ratio:.2f}x the highest{f'; refused above {limit}' if limit is not None else ''})"
            if ratio is not None
            else ""
        )
    )
    if result["flagged"]:
        raise UserError(
            f"The merge looks broken: its perplexity on {texts} held-out chosen answers is {found['merged']:.4g}, "
            f"{ratio:.1f}x the highest of its parents' ({listing}), above pipeline.merge_check.max_perplexity_ratio="
            f"{limit}; annealing it would spend the run on gibberish. Fix: check the merge ({merged_dir}) and its "
            "config (weights, t, density or lambda near their usual ranges; a passthrough's layer ranges; the "
            "models' tokenizers), or anneal it anyway with pipeline.merge_check.max_perplexity_ratio=null."
        )
    return result
