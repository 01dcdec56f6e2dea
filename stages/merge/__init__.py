"""Stage 1, merge: mergekit merges the parents into `<run_dir>/merge/model/`.

The `merge` config group *is* a mergekit configuration (or `config_file:` naming one), and it alone names the
models merged. A file holds what mergekit's own tools take:
- one merge (mergekit-yaml);
- a chain of merges (mergekit-multi): several YAML documents, each intermediate with a `name:` that later documents
  use as a model; the unnamed document (else the one no other uses) is the final merge, the one annealed. Each
  intermediate lands in `<run_dir>/merge/intermediates/<name>/`;
- a mixture of experts built from dense experts (mergekit-moe: `base_model` and `experts`).
Each document is validated by mergekit's own types (`MergeConfiguration` and its method registry,
`MoEMergeConfig`), run in-process, checked (every tensor its architecture has is there and finite, the embeddings
cover the tokenizer) and kept in a content-addressed cache: the same resolved config over the same parent files
(an intermediate: by its own key) with the same mergekit version is merged once.
"""

import logging
from functools import partial
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, merge_config, records
from pipeline.artifacts import disk_full, publish, through_cache
from pipeline.settings import CachePolicy
from stages.merge import cache as caching
from stages.merge.cache import CONFIG_NAME
from stages.merge.config import (
    build_options,
    mergekit_says,
    method_name,
    ordered_references,
    parents_in_order,
    prepare,
    validate,
    yaml_text,
)
from stages.merge.integrity import check_merged

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """The merge settings, before the first stage runs: the merge config read and planned (a chain's documents in
    order), the cache policy. mergekit's own types validate each document and `merge_options` at the stage's start,
    before any merge runs: importing mergekit costs seconds that a merge found in the cache from its inputs alone
    never pays."""
    CachePolicy.of_pipeline(cfg.pipeline)
    merge_config.plan(merge_config.load(cfg), Path("intermediates"), Path("model"))


def run(cfg: DictConfig, run_dir: Path) -> records.MergeRecord:
    """Merge the parents; returns the stage's record (inputs with their provenance, outputs, config, cache).

    Phases: plan the documents -> an earlier merge of the same inputs (without importing mergekit) -> validate every
    document -> merge each (cached) -> record."""
    cache = CachePolicy.of_pipeline(cfg.pipeline)
    docs = merge_config.load(cfg)
    out_dir = Path(run_dir) / "merge" / "model"
    steps = merge_config.plan(docs, out_dir.parent / "intermediates", out_dir)
    memo = cache.cache_dir / "fingerprints"
    groups = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("merge", "models", "merge_options")}
    inputs = caching.inputs_key(groups, docs[0], memo) if cache.cache and len(steps) == 1 else None
    if inputs is not None:  # the same inputs merged before: the record and the entry, without importing mergekit
        known = caching.remembered(inputs, cache, out_dir, partial(merge_again, docs[0], cfg.merge_options))
        if known is not None:
            log_cache(known.cache["merge"], cache.cache_dir / "merges" / known.cache["key"])
            return known
    checked = [validate(step.raw) for step in steps]  # every document, by mergekit's types, before any merge runs
    options = build_options(cfg.merge_options)
    merged = merge_steps(steps, checked, options, cache)
    record = make_record(merged, steps, options, cfg, out_dir)
    if inputs is not None:
        caching.remember(cache.cache_dir, inputs, record)
    return record


def merge_steps(steps: list[merge_config.Step], checked: list, options, cache: CachePolicy) -> dict:
    """Each merge of the plan in order (one; a chain's intermediates first), through the cache: the configs, the
    models' provenance, the folders a chain's merges produced (-> their cache identity), each step's record."""
    produced, configs, sources, done = {}, [], {}, []
    for step, valid in zip(steps, checked):
        config, found = prepare(step.raw, options, produced, valid)
        configs.append(config)
        sources.update({s.path: s for s in found})
        text = merge_config.chain_yaml(steps, configs, step, yaml_text)
        state, key = "off", None
        if cache.cache:
            key = caching.cache_key(config, options, version("mergekit"), cache.cache_dir / "fingerprints", produced)
            entry = cache.cache_dir / "merges" / key
            state = through_cache(
                entry,
                partial(merge_into, config, options, text=text),
                step.out_dir,
                files=cache.cache_files,
                digests=cache.cache_verify,
            )
            log_cache(state, entry, step.name)
        else:
            merge_into(config, options, step.out_dir, text)
        if step.name:
            produced[str(step.out_dir)] = f"merge:{step.name}:{key}"
        done.append(
            {
                "name": step.name,
                "merge_method": method_name(config),
                "model": str(step.out_dir),
                "models": [str(r.model.path) for r in ordered_references(config)],
                "cache": {"merge": state, **({"key": key} if key else {})},
            }
        )
    return {"configs": configs, "sources": sources, "produced": produced, "steps": done}


def make_record(
    merged: dict, steps: list[merge_config.Step], options, cfg: DictConfig, out_dir: Path
) -> records.MergeRecord:
    configs, produced, single = merged["configs"], merged["produced"], len(steps) == 1
    final = configs[-1]
    own_file = "config_file" in cfg.merge
    return records.MergeRecord(
        inputs={
            "models": sorted({str(r.model.path) for c in configs for r in ordered_references(c)} - set(produced)),
            "parents": list(dict.fromkeys(p for c in configs for p in parents_in_order(c) if p not in produced)),
            "base_model": merge_config.lineage_base(configs, steps, base_path),
            "config_file": str(Path(cfg.merge.config_file).resolve()) if own_file else None,
            "sources": list(merged["sources"].values()),
        },
        outputs={
            "model": str(out_dir),
            "config": str(out_dir / CONFIG_NAME),
            **({} if single else {"intermediates": {s.name: str(s.out_dir) for s in steps[:-1]}}),
        },
        config={
            "merge": final.model_dump(mode="json", exclude_defaults=True),
            "merge_options": options.model_dump(mode="json"),
            # the `models` group feeds the method presets only: a user's own mergekit YAML names its models
            "models": None if own_file else OmegaConf.to_container(cfg.models, resolve=True),
        },
        merge_method=method_name(final),
        cache=merged["steps"][-1]["cache"],
        mergekit_version=version("mergekit"),
        **({} if single else {"chain": merged["steps"]}),
    )


def base_path(config):
    return str(config.base_model.model.path) if config.base_model else None


def merge_again(raw: dict, section: DictConfig, entry: Path) -> None:
    """The full merge of one remembered document into `entry` (its cached entry was gone or damaged)."""
    options = build_options(section)
    config, _ = prepare(raw, options)
    merge_into(config, options, entry, yaml_text(config))


def log_cache(state: str, entry: Path, name: str | None = None) -> None:
    what = f" intermediate {name!r}:" if name else ""
    done = "reused the cached merge of the same inputs" if state == "hit" else "merged"
    log.info(f"merge:{what} {done} (cache entry {entry.name[:12]})")


def merge_into(config, options, out_dir: Path, text: str) -> None:
    """Run mergekit (mergekit-moe for a mixture of experts) into a temporary sibling folder, write `text` (the
    resolved YAML) beside the weights, check the result, and move it into place only once it is complete."""

    def work(tmp: Path) -> None:
        from mergekit.merge import run_merge

        options.apply_global_options()  # run_merge alone ignores num_threads
        try:
            if method_name(config) == "moe":
                build_moe(config, options, tmp)
            else:
                run_merge(config.model_copy(deep=True), str(tmp), options=options)  # run_merge mutates it
        except (RuntimeError, ValueError, KeyError, AssertionError) as err:
            if disk_full(err):
                raise
            raise UserError(
                f"mergekit could not merge these models ({type(err).__name__}: {err}). Fix: check "
                "that the merge config fits the models (layer ranges, parameters, base model)."
            ) from None
        (tmp / CONFIG_NAME).write_text(text + "\n")
        check_merged(tmp)

    publish(out_dir, work)


def build_moe(config, options, out_dir: Path) -> None:
    """mergekit-moe's build, with the base model's tokenizer as it is (mergekit-moe's own copy changes its padding
    side and token) and random gates seeded by `random_seed`; its warnings (degenerate gates) are ours to show."""
    import torch
    from mergekit.scripts.moe import build
    from transformers import AutoTokenizer

    if options.random_seed is not None:
        torch.manual_seed(options.random_seed)  # gate_mode random / uniform_random draw from torch's global RNG
    with mergekit_says() as said:
        build(config, str(out_dir), options.model_copy(update={"copy_tokenizer": False}), device=options.device)
    for message in said:
        log.warning(f"merge: mergekit-moe: {message}")
    AutoTokenizer.from_pretrained(config.base_model.model.path).save_pretrained(out_dir)
