"""Is a merge fit to anneal? Two checks, before any time is spent on it.

- `check_merged` (the merge stage, on every merge it writes, before it is cached): every tensor its architecture
  has is there, in its shape (transformers' own loading report: mergekit has dropped tensors silently), the
  embeddings have a row for every token of the tokenizer, every value is finite.
- `perplexity_gate` (the anneal stage, before the reference pass): a merge can come out broken with every tensor in
  place and finite (extreme weights, a passthrough stacking layers out of order, mismatched tokenizers). It scores
  a spread of held-out chosen answers with the merged model and with every parent, the way eval does (TRL's
  tokenisation), and refuses a merge whose perplexity is far above every parent's (`pipeline.merge_check`).
"""

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline import UserError, models, preferences, records

log = logging.getLogger(__name__)


def perplexity_gate(cfg: DictConfig, merge: records.MergeRecord) -> dict | None:
    """Perplexity on up to `pipeline.merge_check.texts` held-out chosen answers, of the merged model and of each
    parent sharing its vocabulary; a merge above `max_perplexity_ratio` times the highest parent's is refused
    (null: recorded only). None when the check is off (texts 0)."""
    check = cfg.pipeline.merge_check
    if not check.texts:
        return None
    import torch

    from pipeline.metrics import perplexity
    from stages.eval import _truncation_mode, load_tokenizer, score, spread, tokenize_completion

    merged_dir = Path(merge.outputs.model)
    heldout = preferences.load_preferences(cfg.data)[0]["heldout"]
    rows = heldout.select(spread(list(range(len(heldout))), int(check.texts)))
    tokenizer = load_tokenizer(merged_dir)
    trainer = cfg.anneal.trainer
    texts = [tokenize_completion(tokenizer, r["prompt"], r["chosen"], trainer.max_length,
                                 _truncation_mode(trainer.get("truncation_mode"))) for r in rows]
    texts = [(ids, mask) for ids, mask in texts if any(mask)]  # an answer the length limit left nothing of: none
    if not texts:  # the anneal refuses such data itself, with its counts
        log.warning("anneal: no merge check: no held-out answer fits anneal.trainer.max_length")
        return None
    candidates = {"merged": merged_dir, **{f"parent:{Path(p).name}": Path(p) for p in merge.inputs.parents}}
    found = {}
    for name, folder in candidates.items():
        if name != "merged":
            try:
                models.check_same_vocabulary(tokenizer, merged_dir, folder, f"Parent {name}", "")
            except UserError:  # its scores on the merged model's token ids would mean nothing
                log.info(f"anneal: merge check leaves out {name} (another vocabulary)")
                continue
        model = load_for_scoring(folder)
        with torch.no_grad():
            scored = score(model, texts, cfg.eval.batch_size, tokenizer.pad_token_id or 0)
        found[name] = perplexity(float(-scored["logps"].sum()), int(scored["tokens"].sum()))
        del model
        models.release_memory()
    parents = {name: value for name, value in found.items() if name != "merged"}
    highest = max(parents.values(), default=None)
    ratio = found["merged"] / highest if highest else None
    limit = check.max_perplexity_ratio
    result = {"texts": len(texts), "perplexity": found, "ratio": ratio, "max_ratio": limit,
              "flagged": bool(limit is not None and ratio is not None and ratio > limit)}
    listing = ", ".join(f"{name.removeprefix('parent:')} {value:.4g}" for name, value in parents.items())
    log.info(f"anneal: merge check on {len(texts)} held-out chosen answers: perplexity merged {found['merged']:.4g}, "
             f"parents {listing or 'none comparable'}"
             + (f" ({ratio:.2f}x the highest{f'; refused above {limit}' if limit is not None else ''})"
                if ratio is not None else ""))
    if result["flagged"]:
        raise UserError(
            f"The merge looks broken: its perplexity on {len(texts)} held-out chosen answers is {found['merged']:.4g}, "
            f"{ratio:.1f}x the highest of its parents' ({listing}), above pipeline.merge_check.max_perplexity_ratio="
            f"{limit}; annealing it would spend the run on gibberish. Fix: check the merge ({merged_dir}) and its "
            "config (weights, t, density or lambda near their usual ranges; a passthrough's layer ranges; the "
            "models' tokenizers), or anneal it anyway with pipeline.merge_check.max_perplexity_ratio=null.")
    return result


def check_merged(model_dir: Path) -> None:
    """A merge fit to load and train: its architecture whole (`check_architecture`), every tensor finite
    (`check_finite`)."""
    check_architecture(model_dir)
    check_finite(model_dir)


def check_architecture(model_dir: Path) -> None:
    """A config and a tokenizer; every tensor the architecture has (transformers' own loading report on the meta
    device: mergekit has dropped tensors silently), in its shape; embeddings with a row for every token of the
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    for required in ("config.json", "tokenizer_config.json"):
        if not (model_dir / required).is_file():
            raise RuntimeError(f"mergekit wrote no {required} into {model_dir}")
    fix = ("Fix: check the merge config against the models (slices' layer ranges, a passthrough's layers, "
           "tokenizer_source, the embed_slerp and base model settings) and mergekit's architecture support.")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # nothing is loaded: no "Loading weights" bar
    try:
        model, report = AutoModelForCausalLM.from_pretrained(model_dir, device_map="meta", output_loading_info=True,
                                                             ignore_mismatched_sizes=True)
    except (ValueError, OSError, KeyError) as err:  # an architecture transformers has no class for
        log.warning(f"merge: the merged architecture cannot be checked by transformers ({err})")
        model, report = None, {}
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(report.get("missing_keys", []))
    if missing:
        raise UserError(f"The merge lacks {len(missing)} tensor(s) its architecture has ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}): mergekit left them out. {fix}")
    mismatched = report.get("mismatched_keys", [])
    if mismatched:
        name, stored, expected = sorted(mismatched)[0]
        raise UserError(f"The merge's tensor '{name}' has shape {list(stored)} where its config asks for "
                        f"{list(expected)} ({len(mismatched)} such). {fix}")
    if model is not None:
        rows = min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
        tokens = len(AutoTokenizer.from_pretrained(model_dir))
        if tokens > rows:
            raise UserError(f"The merge's tokenizer has {tokens} tokens but its embeddings only {rows} rows: tokens "
                            f"beyond row {rows} would index past them. {fix}")


def check_finite(model_dir: Path) -> None:
    """Every value of every stored tensor finite."""
    import torch
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if not torch.isfinite(handle.get_tensor(name)).all():
                    raise UserError(f"The merge produced non-finite values in '{name}'. Fix: check the merge "
                                    "parameters (weights, t, density, lambda) for extreme values.")


def load_for_scoring(folder: Path):
    """A model to score with: float32 on the CPU; bf16 where CUDA GPUs are, spread over them (accelerate's
    device_map="auto") where one cannot hold a real checkpoint alone."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if cuda else torch.float32,
                                                device_map="auto" if cuda else None).eval()
