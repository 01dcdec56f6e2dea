"""The merge cache: a merge is content-addressed by its resolved config with each model replaced by its files'
fingerprint, the options that change what is written, and mergekit's version (`cache_key`). A second key from the
inputs alone (`inputs_key`: the config as given, the groups, the folders' fingerprints) finds an earlier merge's
record without importing mergekit (`remembered`).
"""

import json
from importlib.metadata import version
from pathlib import Path

from pipeline import merge_config, models, records
from pipeline.artifacts import through_cache, write_text
from pipeline.settings import CachePolicy
from stages.merge.config import ordered_references

# Options that change how a merge runs but not what it writes: left out of the cache key.
RUNTIME_ONLY_OPTIONS = {
    "quiet",
    "verbosity",
    "num_threads",
    "lazy_unpickle",
    "transformers_cache",
    "lora_merge_cache",
    "low_cpu_memory",
    "read_to_gpu",
    "multi_gpu",
    "async_write",
    "write_threads",
}
BY_INPUTS = ".by-inputs"  # merges/.by-inputs/<inputs_key>.json: the record of that merge, with its cache key
CONFIG_NAME = "mergekit_config.yml"


def inputs_key(groups: dict, raw: dict, memo: Path) -> str | None:
    """A key of everything a merge reads, computed without mergekit: the config as given, the merge, models and
    merge_options groups (`groups`, as plain containers), mergekit's version and the fingerprint of every model
    folder it names (remembered across runs by the files' stat, `memo`). None when a model is not a local folder (a
    hub id goes through `prepare`, which resolves it)."""
    import hashlib

    folders, tokenizers = merge_config.model_references(raw)
    if not folders or not all(Path(folder).is_dir() for folder in folders):
        return None
    content = {
        "config": raw,
        "groups": groups,
        "mergekit": version("mergekit"),
        "merge-anneal": 1,
        "folders": {f: models.fingerprint(f, memo) for f in sorted({*folders, *tokenizers})},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]


def remembered(inputs: str, cache: CachePolicy, out_dir: Path, rebuild) -> records.MergeRecord | None:
    """The record of an earlier merge of exactly these inputs, its cached entry put at `out_dir` (`rebuild(entry)`
    merges again, the full way, when the entry is gone or fails its check); None when there is none."""
    merges = cache.cache_dir / "merges"
    try:
        known = json.loads((merges / BY_INPUTS / f"{inputs}.json").read_text())
        record = records.MergeRecord.model_validate(
            {**known, "outputs": {"model": str(out_dir), "config": str(out_dir / CONFIG_NAME)}}
        )
    except (OSError, ValueError):
        return None
    state = through_cache(
        merges / record.cache["key"], rebuild, out_dir, files=cache.cache_files, digests=cache.cache_verify
    )
    return record.model_copy(update={"cache": {**record.cache, "merge": state}})


def remember(cache_root: Path, inputs: str, record: records.MergeRecord) -> None:
    folder = cache_root / "merges" / BY_INPUTS
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{inputs}.json", record.model_dump_json(exclude={"outputs", "status", "seconds", "versions"}))


def cache_key(config, options, version: str, memo: Path | None = None, produced: dict | None = None) -> str:
    """Content address of a merge: the resolved config with each model path replaced by its file fingerprint
    (remembered across runs by the files' stat in `memo`, as `inputs_key` does: a hub snapshot, which `inputs_key`
    cannot key, is hashed once, not on every run) or, for a chain's intermediate, by its own key (`produced`), the
    options that change the output, and the mergekit version."""
    import hashlib

    fingerprints = {}
    for ref in ordered_references(config):
        for path in (ref.model, ref.lora):
            if path is not None:
                fingerprints[str(path.path)] = (produced or {}).get(str(path.path)) or "sha256:" + models.fingerprint(
                    path.path, memo
                )
    content = {
        "config": merge_config.replace_strings(config.model_dump(mode="json"), fingerprints),
        "options": {k: v for k, v in options.model_dump(mode="json").items() if k not in RUNTIME_ONLY_OPTIONS},
        "mergekit": version,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]
