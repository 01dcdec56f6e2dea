"""The reference pass: every pair scored once by the reference policy, through TRL's own precompute
(tokenisation, truncation, masks, log-probs), stored as parquet (`prompt, chosen, rejected, ref_chosen_logps,
ref_rejected_logps`) and cached across runs by (reference weights, tokenizer, data, lengths).

Under more than one process (accelerate) TRL splits the batches across the ranks and gathers the log-probs in
order: every batch is the one a single process would score, so the store is the single-process store. The main
rank writes it; the others wait and read it.
"""

import hashlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path

from pipeline import UserError, models, perf, preferences
from pipeline.artifacts import publish, through_cache

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def reference_logps(reference_dir: str, fingerprint: str, tokenizer, pairs, args, precision, cfg, stage_dir: Path,
                    ranks) -> tuple[Path, str]:
    """The store of every pair's reference log-probs at `<stage_dir>/reference_logps/data.parquet`, from the cache
    when the same reference, tokenizer, data and lengths were scored before. Returns (path, "hit" | "miss").
    `ranks`: accelerate's PartialState (one process or many; every rank calls this)."""
    local = stage_dir / "reference_logps"
    hash_cm = lambda: perf.known_model_hash(fingerprint, cfg.anneal.perf.skip_trl_model_hash)

    def build(target: Path) -> None:  # collective: every rank scores its share, the main rank writes
        scored = score_with_reference(reference_dir, tokenizer, pairs, args, precision, hash_cm(), stage_dir, ranks)
        if ranks.is_main_process:
            publish(target, lambda tmp: (tmp.mkdir(), preferences.write_store(scored, tmp / "data.parquet")))

    if not cfg.pipeline.cache:
        build(local)
        ranks.wait_for_everyone()
        return local / "data.parquet", "miss"
    key = hashlib.sha256(json.dumps({
        "reference": fingerprint, "tokenizer": models.tokenizer_fingerprint(tokenizer),
        "data_rows": {split: preferences.rows_fingerprint(pairs[split]) for split in pairs},
        "max_length": args.max_length, "truncation_mode": args.truncation_mode, "ld_alpha": args.ld_alpha,
        "autocast": bool(args.bf16), "trl": version("trl"),
    }, sort_keys=True).encode()).hexdigest()[:32]
    entry = Path(cfg.pipeline.cache_dir).expanduser() / "reference_logps" / key
    return local / "data.parquet", through_cache(entry, build, local, ranks, files=cfg.pipeline.cache_files,
                                                digests=cfg.pipeline.cache_verify)


def score_with_reference(reference_dir: str, tokenizer, pairs, args, precision, trl_model_hash, stage_dir: Path,
                         ranks):
    """One batched no-grad pass of the reference through TRL's own precompute over the train and held-out pairs,
    split across the ranks. Returns the pairs TRL kept (a prompt alone filling `max_length` is dropped) with their
    log-probs; a split left empty is refused. The reference is freed before this returns."""
    import datasets
    from datasets import DatasetDict
    from trl import DPOTrainer

    class ScoringTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if len(dataset) == 0:  # TRL would fail on an empty concatenation
                split = "train" if name == "train" else "heldout"
                raise UserError(
                    f"Every one of the {len(pairs[split])} {split} pairs has a prompt (with the chat template's "
                    f"system prompt and generation prompt, where the data is conversational) of at least "
                    f"anneal.trainer.max_length={args.max_length} tokens, so TRL drops them all and nothing is left "
                    f"to {'train on' if split == 'train' else 'evaluate'}. Fix: raise anneal.trainer.max_length "
                    "(e.g. 1024 or 2048 for chat models), or shorten the prompts.")
            return super()._precompute_ref_logps(dataset, name, batch_size)

    # TRL's precompute writes its columns next to the data set's own arrow files and every rank reads them back:
    # the pairs are saved once in the stage folder, so those files are shared by the ranks and removed after.
    work = stage_dir / ".reference-pass"
    if ranks.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        DatasetDict({split: ds.add_column("row", list(range(len(ds)))) for split, ds in pairs.items()}
                    ).save_to_disk(str(work))
    ranks.wait_for_everyone()
    # bf16 Linear weights under autocast, which would cast each at every forward: loaded as such
    reference = models.load_causal_lm(reference_dir, precision.reference_linear_weights).requires_grad_(False)
    caching = datasets.is_caching_enabled()
    datasets.enable_caching()
    try:
        indexed = datasets.load_from_disk(str(work))
        with trl_model_hash:
            trainer = ScoringTrainer(model=reference, args=args, train_dataset=indexed["train"],
                                     eval_dataset=indexed["heldout"], processing_class=tokenizer)
        scored = DatasetDict({"train": _attach(pairs["train"], trainer.train_dataset),
                              "heldout": _attach(pairs["heldout"], trainer.eval_dataset)})
    finally:
        if not caching:
            datasets.disable_caching()
    del trainer, reference
    models.release_memory()  # the reference is gone before the policy is loaded
    ranks.wait_for_everyone()
    if ranks.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
    return scored


def _attach(original, scored):
    """Original rows (untouched text) with the reference log-probs, matched by row index; rows TRL dropped
    (prompt alone fills max_length) are left out."""
    from datasets import Value

    column = lambda name: scored[name][:]  # a list at once (iterating a datasets Column goes row by row)
    kept = original.select(column("row"))
    for name in REF_COLUMNS:
        kept = kept.add_column(name, column(name), feature=Value("float64"))
    return kept
