"""Stage 1, merge: mergekit merges the parents into `<run_dir>/merge/model/`.

The `merge` config group *is* a mergekit configuration (or `config_file:` naming one). It is validated
by mergekit's own `MergeConfiguration` and method registry, run in-process with `run_merge`, and kept in
a content-addressed cache: the same resolved config over the same parent files with the same mergekit
version is merged once.
"""

import json
import logging
from importlib.metadata import version
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import UserError, models, records
from pipeline.artifacts import disk_full, publish, through_cache, write_text

log = logging.getLogger(__name__)

# MergeOptions fields merge-anneal fixes: safetensors only; it writes the resolved YAML itself because
# mergekit's card writer reaches for the network; the tokenizer always comes from the donor.
FIXED_OPTIONS = {"safe_serialization": True, "write_model_card": False, "copy_tokenizer": True}
# Options that change how a merge runs but not what it writes: left out of the cache key.
RUNTIME_ONLY_OPTIONS = {"quiet", "verbosity", "num_threads", "lazy_unpickle", "transformers_cache",
                        "lora_merge_cache", "low_cpu_memory", "read_to_gpu", "multi_gpu", "async_write",
                        "write_threads"}
CONFIG_NAME = "mergekit_config.yml"


def run(cfg: DictConfig, run_dir: Path) -> records.MergeRecord:
    """Merge the parents; returns the stage's record (inputs with their provenance, outputs, config, cache)."""
    raw = load_merge_config(cfg)
    out_dir = Path(run_dir) / "merge" / "model"
    cache_root = Path(cfg.pipeline.cache_dir).expanduser()
    inputs = inputs_key(cfg, raw, cache_root / "fingerprints") if cfg.pipeline.cache else None
    if inputs is not None:  # the same inputs merged before: the record and the entry, without importing mergekit
        known = remembered(cfg, raw, inputs, cache_root, out_dir)
        if known is not None:
            log_cache(known.cache["merge"], cache_root / "merges" / known.cache["key"])
            return known

    merge_config, options, sources = prepare(cfg, raw)
    cache_state, key = "off", None
    if cfg.pipeline.cache:
        key = cache_key(merge_config, options, version("mergekit"), cache_root / "fingerprints")
        cached_dir = cache_root / "merges" / key
        cache_state = through_cache(cached_dir, lambda entry: merge_into(merge_config, options, entry), out_dir,
                                    files=cfg.pipeline.cache_files, digests=cfg.pipeline.cache_verify)
        log_cache(cache_state, cached_dir)
    else:
        merge_into(merge_config, options, out_dir)

    record = records.MergeRecord(
        inputs={"models": sorted(str(m.model.path) for m in merge_config.referenced_models()),
                "parents": parents_in_order(merge_config), "base_model": _base_path(merge_config),
                "config_file": str(Path(cfg.merge.config_file).resolve()) if "config_file" in cfg.merge else None,
                "sources": sources},
        outputs={"model": str(out_dir), "config": str(out_dir / CONFIG_NAME)},
        config={"merge": merge_config.model_dump(mode="json", exclude_defaults=True),
                "merge_options": options.model_dump(mode="json"),
                # the `models` group feeds the method presets only: a user's own mergekit YAML names its models
                "models": None if "config_file" in cfg.merge else OmegaConf.to_container(cfg.models, resolve=True)},
        merge_method=merge_config.merge_method,
        cache={"merge": cache_state, **({"key": key} if key else {})},
        mergekit_version=version("mergekit"),
    )
    if inputs is not None:
        remember(cache_root, inputs, record)
    return record


def log_cache(state: str, entry: Path) -> None:
    log.info(f"merge: {'reused cached merge' if state == 'hit' else 'merged'} {entry}")


def prepare(cfg: DictConfig, raw: dict):
    """The merge config with every model a local folder, validated by mergekit's types, the MergeOptions, and
    the models' provenance; parents that cannot be merged are refused here."""
    localized, sources = localize(raw)
    merge_config = validate(localized)
    options = build_options(cfg.merge_options)
    check_compatible(merge_config, allow_crimes=options.allow_crimes)
    return merge_config, options, sources


# Where a mergekit config names a model (models[].model, base_model, slices' and modules' sources).
MODEL_KEYS = ("model", "base_model")


def model_references(raw) -> tuple[list[str], list[str]]:
    """The models a mergekit config names, as written and in order (`model+lora`: both), and the local folders its
    `tokenizer_source` names; read from the config alone (no mergekit import, nothing resolved)."""
    named, tokenizers = [], []

    def walk(node, key=None):
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, name)
        elif isinstance(node, list):
            for value in node:
                walk(value, key)
        elif key in MODEL_KEYS and isinstance(node, str):
            named.extend(node.split("+"))
        elif key == "tokenizer_source" and isinstance(node, str) and Path(node).is_dir():
            tokenizers.append(node)

    walk(raw)
    return list(dict.fromkeys(named)), list(dict.fromkeys(tokenizers))


def inputs_key(cfg: DictConfig, raw: dict, memo: Path) -> str | None:
    """A key of everything a merge reads, computed without mergekit: the config as given, the merge, models and
    merge_options groups, mergekit's version and the fingerprint of every model folder it names (remembered
    across runs by the files' stat, `memo`). None when a model is not a local folder (a hub id goes through
    `prepare`, which resolves it)."""
    import hashlib

    folders, tokenizers = model_references(raw)
    if not folders or not all(Path(folder).is_dir() for folder in folders):
        return None
    content = {"config": raw, "groups": {name: OmegaConf.to_container(cfg[name], resolve=True)
                                         for name in ("merge", "models", "merge_options")},
               "mergekit": version("mergekit"), "merge-anneal": 1,
               "folders": {f: models.fingerprint(f, memo) for f in sorted({*folders, *tokenizers})}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]


def remembered(cfg: DictConfig, raw: dict, inputs: str, cache_root: Path, out_dir: Path):
    """The record of an earlier merge of exactly these inputs, its cached entry put at `out_dir` (merged again,
    the full way, when the entry is gone or fails its check); None when there is none."""
    try:
        known = json.loads((cache_root / "merges" / BY_INPUTS / f"{inputs}.json").read_text())
        record = records.MergeRecord.model_validate({**known, "outputs": {"model": str(out_dir),
                                                                          "config": str(out_dir / CONFIG_NAME)}})
    except (OSError, ValueError):
        return None

    def build(entry: Path) -> None:  # only when the remembered entry is gone or damaged
        merge_config, options, _ = prepare(cfg, raw)
        merge_into(merge_config, options, entry)

    state = through_cache(cache_root / "merges" / record.cache["key"], build, out_dir,
                          files=cfg.pipeline.cache_files, digests=cfg.pipeline.cache_verify)
    return record.model_copy(update={"cache": {**record.cache, "merge": state}})


BY_INPUTS = ".by-inputs"  # merges/.by-inputs/<inputs_key>.json: the record of that merge, with its cache key


def remember(cache_root: Path, inputs: str, record: records.MergeRecord) -> None:
    folder = cache_root / "merges" / BY_INPUTS
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{inputs}.json", record.model_dump_json(exclude={"outputs", "status", "seconds", "versions"}))


def load_merge_config(cfg: DictConfig) -> dict:
    """The mergekit configuration as a plain dict: the `merge` group itself, or the file it names."""
    try:
        if "config_file" not in cfg.merge:
            return OmegaConf.to_container(cfg.merge, resolve=True)
        path = Path(cfg.merge.config_file).expanduser()
    except OmegaConfBaseException as err:
        raise UserError(f"The merge config cannot be resolved: {err.msg if hasattr(err, 'msg') else err}. Fix: "
                        "with models=local, set models.parents=[...] (and models.base=... for methods with a "
                        "base model); with +merge=custom, set merge.config_file=PATH.") from None
    if not path.is_file():
        raise UserError(f"merge.config_file {path} does not exist. Fix: pass the path of your mergekit YAML, "
                        "e.g. +merge=custom merge.config_file=examples/my-merge.yml.")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({err}). Fix: correct the file.") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} does not hold a mergekit configuration (a YAML mapping with merge_method). "
                        "Fix: point merge.config_file at a mergekit YAML.")
    return loaded


def localize(raw: dict) -> tuple[dict, list[records.ModelSource]]:
    """Replace every model reference by an absolute local folder (hub ids are downloaded first); also returns
    where each came from (`ModelSource`: folder, hub id, downloaded commit), in config order."""
    merge_config = validate(raw)
    resolved = {}
    for ref in ordered_references(merge_config):
        for path in (ref.model, ref.lora):
            if path is None:
                continue
            if path.revision and not models.is_hub_id(str(path)):
                raise UserError(f"{path} has a revision but is not a hub id. Fix: use org/name@revision or a "
                                "local folder without '@'.")
            resolved[str(path)] = models.resolve(str(path))
    mapping = {ref: source.path for ref, source in resolved.items()}
    return _replace_strings(raw, mapping), list({s.path: s for s in resolved.values()}.values())


def _replace_strings(node, mapping: dict):
    if isinstance(node, dict):
        return {k: _replace_strings(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_strings(v, mapping) for v in node]
    if isinstance(node, str):
        if "+" in node and all(part in mapping for part in node.split("+")):  # model+lora
            return "+".join(mapping[part] for part in node.split("+"))
        return mapping.get(node, node)
    return node


def validate(raw: dict):
    """Validate with mergekit's own types: `MergeConfiguration`, the method registry and its input contract."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry
    from pydantic import ValidationError

    try:
        merge_config = MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, ValueError) as err:
        raise UserError(f"mergekit rejected the merge config: {_short(err)}. Fix: correct the merge group "
                        "(see conf/merge/ and mergekit's docs) or your merge.config_file.") from None
    known = sorted(m.spec.name for m in registry.registered_methods())
    if merge_config.merge_method not in known:
        raise UserError(f"Unknown merge method '{merge_config.merge_method}'. Fix: use one of mergekit's methods: "
                        f"{', '.join(known)} (e.g. +merge=slerp).")
    spec = registry.get(merge_config.merge_method).spec
    _check_parameters(merge_config, spec)
    _check_inputs(merge_config, spec)
    return merge_config


def _check_parameters(merge_config, spec) -> None:
    known = {p.name for p in spec.parameters}
    given = set(merge_config.parameters or {})
    for model in merge_config.models or []:
        given |= set(model.parameters or {})
    for out_slice in merge_config.slices or []:
        given |= set(out_slice.parameters or {})
        for source in out_slice.sources:
            given |= set(source.parameters or {})
    unknown = sorted(given - known)
    if unknown:
        raise UserError(f"Merge method '{spec.name}' has no parameter(s) {unknown}. Fix: use its parameters: "
                        f"{sorted(known) or 'none'}.")
    if merge_config.models:
        for p in spec.parameters:
            top = p.name in (merge_config.parameters or {})
            if p.required and not top and p.scope.value == "shared":
                raise UserError(f"Merge method '{spec.name}' needs parameter '{p.name}'. Fix: set "
                                f"merge.parameters.{p.name}=<value>.")


def _check_inputs(merge_config, spec) -> None:
    if not merge_config.models:
        return  # slices and modules are checked by mergekit while planning
    ids = [str(m.model) for m in merge_config.models]
    base = str(merge_config.base_model) if merge_config.base_model else None
    if spec.contract.base.value == "required" and base is None:
        raise UserError(f"Merge method '{spec.name}' needs a base model and none is set. Fix: set "
                        "models.base=<folder or hub id> (with models=local) or base_model in your mergekit YAML.")
    if base is not None and base not in ids and spec.contract.base.value != "ignored":
        ids.append(base)  # mergekit adds the base model to the inputs the same way
    try:
        spec.contract.validate_ids(ids, base)
    except ValueError as err:
        raise UserError(f"Merge method '{spec.name}' cannot merge these models: {err}. Fix: adjust models.parents "
                        f"/ models.base or the models list ({len(ids)} inputs given).") from None


def check_compatible(merge_config, allow_crimes: bool) -> None:
    """Parents must share the architecture and, for every tensor they share, its shape."""
    from safetensors import safe_open

    vocab_rebuilt = merge_config.tokenizer_source is not None or merge_config.tokenizer is not None
    archs, shapes = {}, {}
    for ref in ordered_references(merge_config):
        folder = Path(ref.model.path)
        archs[folder] = tuple(json.loads((folder / "config.json").read_text()).get("architectures") or [])
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    shapes.setdefault(name, {})[folder] = tuple(handle.get_slice(name).get_shape())
    if len(set(archs.values())) > 1 and not allow_crimes:
        listing = "; ".join(f"{f.name}: {'/'.join(a) or '?'}" for f, a in archs.items())
        raise UserError(f"The models have different architectures ({listing}). Fix: merge checkpoints of one "
                        "architecture (fine-tunes of the same base), or set merge_options.allow_crimes=true "
                        "if you really mean to mix them.")
    for name, by_model in shapes.items():
        if len(set(by_model.values())) > 1:
            if vocab_rebuilt and ("embed" in name or "lm_head" in name):
                continue  # mergekit re-maps vocabularies when a tokenizer source is set
            listing = "; ".join(f"{f.name}: {list(s)}" for f, s in by_model.items())
            raise UserError(f"Tensor shapes differ between the models for '{name}' ({listing}). Fix: merge "
                            "fine-tunes of the same base model (same hidden size, heads and vocabulary).")


def build_options(section: DictConfig):
    from mergekit.merge import MergeOptions
    from pydantic import ValidationError

    given = OmegaConf.to_container(section, resolve=True)
    clash = sorted(set(given) & set(FIXED_OPTIONS))
    if clash:
        raise UserError(f"merge_options.{clash[0]} is fixed by merge-anneal ({FIXED_OPTIONS}). Fix: drop it.")
    try:
        return MergeOptions(**given, **FIXED_OPTIONS)
    except ValidationError as err:
        raise UserError(f"Invalid merge_options: {_short(err)}. Fix: use mergekit's MergeOptions fields "
                        "(see conf/merge_options/default.yaml).") from None


def cache_key(merge_config, options, version: str, memo: Path | None = None) -> str:
    """Content address of a merge: the resolved config with each model path replaced by its file
    fingerprint (remembered across runs by the files' stat in `memo`, as `inputs_key` does: a hub snapshot, which
    `inputs_key` cannot key, is hashed once, not on every run), the options that change the output, and the
    mergekit version."""
    import hashlib

    fingerprints = {str(ref.model.path): "sha256:" + models.fingerprint(ref.model.path, memo)
                    for ref in merge_config.referenced_models()}
    for ref in merge_config.referenced_models():
        if ref.lora is not None:
            fingerprints[str(ref.lora.path)] = "sha256:" + models.fingerprint(ref.lora.path, memo)
    content = {
        "config": _replace_strings(merge_config.model_dump(mode="json"), fingerprints),
        "options": {k: v for k, v in options.model_dump(mode="json").items() if k not in RUNTIME_ONLY_OPTIONS},
        "mergekit": version,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def merge_into(merge_config, options, out_dir: Path) -> None:
    """Run mergekit into a temporary sibling folder and move it into place only once it is complete."""

    def work(tmp: Path) -> None:
        from mergekit.merge import run_merge

        options.apply_global_options()  # run_merge alone ignores num_threads
        try:
            run_merge(merge_config.model_copy(deep=True), str(tmp), options=options)  # run_merge mutates it
        except (RuntimeError, ValueError, KeyError, AssertionError) as err:
            if disk_full(err):
                raise
            raise UserError(f"mergekit could not merge these models ({type(err).__name__}: {err}). Fix: check "
                            "that the merge config fits the models (layer ranges, parameters, base model).") from None
        (tmp / CONFIG_NAME).write_text(merge_config.to_yaml() + "\n")
        check_output(tmp)

    publish(out_dir, work)


def check_output(model_dir: Path) -> None:
    """Every merged tensor is finite, and the folder has a config and a tokenizer."""
    import torch
    from safetensors import safe_open

    for required in ("config.json", "tokenizer_config.json"):
        if not (model_dir / required).is_file():
            raise RuntimeError(f"mergekit wrote no {required} into {model_dir}")
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if not torch.isfinite(handle.get_tensor(name)).all():
                    raise UserError(f"The merge produced non-finite values in '{name}'. Fix: check the merge "
                                    "parameters (weights, t, density, lambda) for extreme values.")


def ordered_references(merge_config, with_base: bool = True) -> list:
    """The models in the order the config lists them (mergekit's referenced_models() is a set, whose
    order changes with PYTHONHASHSEED); the base model last unless listed."""
    listed = [m.model for m in merge_config.models or []]
    for out_slice in merge_config.slices or []:
        listed += [source.model for source in out_slice.sources]
    for module in (merge_config.modules or {}).values():
        listed += [m.model for m in module.models or []]
        listed += [source.model for s in module.slices or [] for source in s.sources]
    if with_base and merge_config.base_model:
        listed.append(merge_config.base_model)
    return list(dict.fromkeys(listed))


def parents_in_order(merge_config) -> list[str]:
    """The merged models' folders in the order the config lists them (the base model only where listed)."""
    return list(dict.fromkeys(str(ref.model.path) for ref in ordered_references(merge_config, with_base=False)))


def _base_path(merge_config):
    return str(merge_config.base_model.model.path) if merge_config.base_model else None


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:600]
