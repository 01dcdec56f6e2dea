"""The reference pass: every pair scored once by the reference policy, through TRL's own precompute
(tokenisation, truncation, masks, log-probs), stored as parquet (`prompt, chosen, rejected, ref_chosen_logps,
ref_rejected_logps`) and cached across runs by (reference weights, tokenizer, data, lengths).

`anneal.reference=parents`: every parent's pass is stored and cached on its own, and `combine` makes the
reference columns of them per pair (`anneal.reference_combine`: mean, max or route), keeping each parent's
columns (`ref_chosen_logps:<parent>`) and which parent spoke (`ref_parent`) beside them.

Under more than one process (accelerate) TRL splits the batches across the ranks and gathers the log-probs in
order: every batch is the one a single process would score, so the store is the single-process store. The main
rank writes it; the others wait and read it.
"""

import hashlib
import json
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pipeline import models, preferences
from pipeline.artifacts import publish, through_cache
from pipeline.preferences import REF_COLUMNS
from pipeline.settings import CachePolicy
from stages.anneal import perf, weights
from stages.anneal.settings import PerfSwitches


@dataclass(frozen=True)
class Scoring:
    """What every reference pass of one anneal shares: the merged model's tokenizer, TRL's DPOConfig (`args`: batch,
    lengths, truncation), the precision, where results are kept, the switches, the stage folder and the ranks
    (accelerate's PartialState: one process or many; every rank runs the pass)."""

    tokenizer: Any
    args: Any
    precision: perf.Precision
    cache: CachePolicy
    perf: PerfSwitches
    stage_dir: Path
    ranks: Any


def reference_logps(
    scoring: Scoring, reference_dir: str, fingerprint: str, pairs, local: Path | None = None
) -> tuple[Path, str]:
    """The store of every pair's reference log-probs at `<local>/data.parquet` (default
    `<stage_dir>/reference_logps`), from the cache when the same reference, tokenizer, data and lengths were scored
    before. Returns (path, "hit" | "miss")."""
    local = local or scoring.stage_dir / "reference_logps"
    pairs = pairs.select_columns(list(preferences.COLUMNS))  # what scoring reads (the data's other columns: not)
    args, ranks = scoring.args, scoring.ranks

    def build(target: Path) -> None:  # collective: every rank scores its share, the main rank writes
        scored = score_with_reference(scoring, reference_dir, fingerprint, pairs)
        if ranks.is_main_process:
            publish(target, lambda tmp: (tmp.mkdir(), preferences.write_store(scored, tmp / "data.parquet")))

    if not scoring.cache.cache:
        build(local)
        ranks.wait_for_everyone()
        return local / "data.parquet", "miss"
    key = hashlib.sha256(
        json.dumps(
            {
                "reference": fingerprint,
                "tokenizer": models.tokenizer_fingerprint(scoring.tokenizer),
                "data_rows": {split: preferences.rows_fingerprint(pairs[split]) for split in pairs},
                "max_length": args.max_length,
                "truncation_mode": args.truncation_mode,
                "ld_alpha": args.ld_alpha,
                "autocast": bool(args.bf16),
                "trl": version("trl"),
                "store": 2,  # 2: with pair_index
                **({"packed": True} if scoring.perf.pack_rows else {}),  # the same values up to float rounding
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    entry = scoring.cache.cache_dir / "reference_logps" / key
    return local / "data.parquet", through_cache(
        entry, build, local, ranks, files=scoring.cache.cache_files, digests=scoring.cache.cache_verify
    )


def parents_reference_logps(scoring: Scoring, references: dict, fingerprints: dict, pairs, combination: str, routes):
    """`anneal.reference=parents`: each parent's pass (cached on its own) at `reference_logps_by_parent/<name>`,
    combined into `reference_logps/data.parquet` by `combination` (`anneal.reference_combine`; `routes`:
    `references.route_of`'s, under route). Returns (store, "hit" when every parent's pass was, else "miss", per
    parent: path, fingerprint, store, cache)."""
    by_parent, ranks = {}, scoring.ranks
    for name, source in references.items():
        path, state = reference_logps(
            scoring,
            source.path,
            fingerprints[name],
            pairs,
            local=scoring.stage_dir / "reference_logps_by_parent" / name,
        )
        by_parent[name] = {"path": source.path, "fingerprint": fingerprints[name], "store": str(path), "cache": state}
    store = scoring.stage_dir / "reference_logps" / "data.parquet"
    if ranks.is_main_process:
        stores = {name: preferences.read_store(Path(p["store"])) for name, p in by_parent.items()}
        combined = combine(stores, combination, routes)
        publish(store.parent, lambda tmp: (tmp.mkdir(), preferences.write_store(combined, tmp / "data.parquet")))
    ranks.wait_for_everyone()
    state = "hit" if all(p["cache"] == "hit" for p in by_parent.values()) else "miss"
    return store, state, by_parent


def combine_logps(chosen, rejected, how: str, route=None):
    """Per pair, one reference log-prob for its chosen and its rejected answer out of K parents' (arrays [K, N],
    float64), and which parent spoke (-1: all, as a mean). mean: log((1/K) sum_k p_k) for each answer; max: the
    parent with the highest chosen log-prob; route: the parent index given per pair."""
    import numpy as np

    logsumexp = np.logaddexp.reduce
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    k, n = chosen.shape
    if how == "mean":
        return (logsumexp(chosen, axis=0) - np.log(k), logsumexp(rejected, axis=0) - np.log(k), np.full(n, -1))
    speaker = np.argmax(chosen, axis=0) if how == "max" else np.asarray(route, dtype=np.int64)
    columns = np.arange(n)
    return chosen[speaker, columns], rejected[speaker, columns], speaker


def combine(stores: dict, how: str, routes: dict | None):
    """The parents' stores (name -> DatasetDict with REF_COLUMNS, the same rows in the same order) as one
    (`routes`: per split, the parent index of each of the pairs, read through the stores' `pair_index`): the
    combined REF_COLUMNS, each parent's as `<column>:<parent>`, and `ref_parent` (the parent that spoke, or
    `mean`)."""
    import numpy as np
    from datasets import DatasetDict, Value

    names = list(stores)
    first = stores[names[0]]
    out = {}
    for split in first:
        base = first[split].remove_columns(list(REF_COLUMNS))
        for name in names[1:]:
            if stores[name][split]["pair_index"] != first[split]["pair_index"]:
                raise RuntimeError(f"the parents' reference passes kept different {split} pairs")
        stacked = [np.stack([np.asarray(stores[n][split][c], dtype=np.float64) for n in names]) for c in REF_COLUMNS]
        route = [routes[split][i] for i in first[split]["pair_index"]] if routes else None
        chosen, rejected, speaker = combine_logps(*stacked, how, route)
        for column, values in zip(REF_COLUMNS, (chosen, rejected)):
            base = base.add_column(column, values.tolist(), feature=Value("float64"))
        for i, name in enumerate(names):
            for c, column in enumerate(REF_COLUMNS):
                base = base.add_column(f"{column}:{name}", stacked[c][i].tolist(), feature=Value("float64"))
        base = base.add_column("ref_parent", ["mean" if s < 0 else names[s] for s in speaker])
        out[split] = base
    return DatasetDict(out)


def score_with_reference(scoring: Scoring, reference_dir: str, fingerprint: str, pairs):
    """One batched no-grad pass of the reference through TRL's own precompute over the train and held-out pairs,
    split across the ranks. Returns the pairs TRL kept (a prompt alone filling `max_length` is dropped) with their
    log-probs; a split left empty is refused. The reference is freed before this returns."""
    import datasets
    from datasets import DatasetDict

    from stages.anneal.trainers import ScoringTrainer

    # TRL's precompute writes its columns next to the data set's own arrow files and every rank reads them back:
    # the pairs are saved once in the stage folder, so those files are shared by the ranks and removed after.
    work, ranks = scoring.stage_dir / ".reference-pass", scoring.ranks
    if ranks.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        DatasetDict({split: ds.add_column("row", list(range(len(ds)))) for split, ds in pairs.items()}).save_to_disk(
            str(work)
        )
    ranks.wait_for_everyone()
    # bf16 Linear weights under autocast, which would cast each at every forward: loaded as such
    reference = weights.load_causal_lm(reference_dir, scoring.precision.reference_linear_weights).requires_grad_(False)
    caching = datasets.is_caching_enabled()
    datasets.enable_caching()
    try:
        indexed = datasets.load_from_disk(str(work))
        with perf.known_model_hash(fingerprint, scoring.perf.skip_trl_model_hash):
            trainer = ScoringTrainer(
                model=reference,
                args=scoring.args,
                train_dataset=indexed["train"],
                eval_dataset=indexed["heldout"],
                processing_class=scoring.tokenizer,
                pack=scoring.perf.pack_rows,
                pairs_given={s: len(ds) for s, ds in pairs.items()},
            )
        scored = DatasetDict(
            {
                "train": _attach(pairs["train"], trainer.train_dataset),
                "heldout": _attach(pairs["heldout"], trainer.eval_dataset),
            }
        )
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
    """Original rows (untouched text) with the reference log-probs and their index in the pairs (`pair_index`),
    matched by row index; rows TRL dropped (prompt alone fills max_length) are left out."""
    from datasets import Value

    column = lambda name: scored[name][:]  # a list at once (iterating a datasets Column goes row by row)
    kept = original.select(column("row")).add_column("pair_index", column("row"))
    for name in REF_COLUMNS:
        kept = kept.add_column(name, column(name), feature=Value("float64"))
    return kept
