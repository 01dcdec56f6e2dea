"""Is a merge whole? `check_merged`, on every merge the stage writes, before it is cached: every tensor its
architecture has is there, in its shape (transformers' own loading report: mergekit has dropped tensors silently),
the embeddings have a row for every token of the tokenizer, every value is finite. (Whether it is fit to anneal,
its held-out perplexity against its parents', is the anneal stage's gate: stages/anneal/gate.py.)
"""

import logging
from pathlib import Path

from pipeline import UserError

log = logging.getLogger(__name__)


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
    fix = (
        "Fix: check the merge config against the models (slices' layer ranges, a passthrough's layers, "
        "tokenizer_source, the embed_slerp and base model settings) and mergekit's architecture support."
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # nothing is loaded: no "Loading weights" bar
    try:
        model, report = AutoModelForCausalLM.from_pretrained(
            model_dir, device_map="meta", output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (ValueError, OSError, KeyError) as err:  # an architecture transformers has no class for
        log.warning(f"merge: the merged architecture cannot be checked by transformers ({err})")
        model, report = None, {}
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(report.get("missing_keys", []))
    if missing:
        raise UserError(
            f"The merge lacks {len(missing)} tensor(s) its architecture has ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): mergekit left them out. {fix}"
        )
    mismatched = report.get("mismatched_keys", [])
    if mismatched:
        name, stored, expected = sorted(mismatched)[0]
        raise UserError(
            f"The merge's tensor '{name}' has shape {list(stored)} where its config asks for "
            f"{list(expected)} ({len(mismatched)} such). {fix}"
        )
    if model is not None:
        rows = min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
        tokens = len(AutoTokenizer.from_pretrained(model_dir))
        if tokens > rows:
            raise UserError(
                f"The merge's tokenizer has {tokens} tokens but its embeddings only {rows} rows: tokens "
                f"beyond row {rows} would index past them. {fix}"
            )


def check_finite(model_dir: Path) -> None:
    """Every value of every stored tensor finite."""
    import torch
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if not torch.isfinite(handle.get_tensor(name)).all():
                    raise UserError(
                        f"The merge produced non-finite values in '{name}'. Fix: check the merge "
                        "parameters (weights, t, density, lambda) for extreme values."
                    )
