"""The merge config as mergekit reads it: each document validated by mergekit's own types (`MergeConfiguration` and
its method registry's parameters and input contract, `MoEMergeConfig` for mergekit-moe), its models made local
folders (hub ids downloaded first, with their provenance), the models checked to be mergeable, mergekit's
`MergeOptions` from `merge_options`, and the models in the order the config lists them.
"""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, merge_config, models, records

# MergeOptions fields merge-anneal fixes: safetensors only; it writes the resolved YAML itself because
# mergekit's card writer reaches for the network; the tokenizer always comes from the donor.
FIXED_OPTIONS = {"safe_serialization": True, "write_model_card": False, "copy_tokenizer": True}
# mergekit-moe's gate modes (mergekit/moe/router.py, get_gate_params).
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")


def prepare(raw: dict, options, produced: dict | None = None, valid=None):
    """The config with every model a local folder (`produced`: the folders earlier merges of a chain wrote, used as
    they are), validated by mergekit's types, and the models' provenance; models that cannot be merged are refused
    here. `valid`: `raw` already validated."""
    localized, sources = localize(raw, produced, valid)
    config = validate(localized)
    check_compatible(config, options)
    return config, sources


def yaml_text(config, rename: dict | None = None) -> str:
    """A validated config as mergekit writes one (its defaults left out; a mixture of experts, which mergekit-moe
    does not write, with its defaults: the gate mode and experts per token; `rename`: folders shown by another
    name)."""
    from mergekit.config import ConfigYamlDumper

    content = config.model_dump(
        mode="json", **({"exclude_none": True} if is_moe(config) else {"exclude_defaults": True})
    )
    return yaml.dump(merge_config.replace_strings(content, rename or {}), Dumper=ConfigYamlDumper).rstrip()


def localize(raw: dict, produced: dict | None = None, valid=None) -> tuple[dict, list[records.ModelSource]]:
    """Replace every model reference by an absolute local folder (hub ids are downloaded first; `produced`: folders
    an earlier merge of the chain wrote, kept as they are); also returns where each came from (`ModelSource`:
    folder, hub id, downloaded commit), in config order. `valid`: `raw` already validated."""
    config = valid or validate(raw)
    resolved = {}
    for ref in ordered_references(config):
        for path in (ref.model, ref.lora):
            if path is None or str(path) in (produced or {}):
                continue
            if path.revision and not models.is_hub_id(str(path)):
                raise UserError(
                    f"{path} has a revision but is not a hub id. Fix: use org/name@revision or a "
                    "local folder without '@'."
                )
            resolved[str(path)] = models.resolve(str(path))
    mapping = {ref: source.path for ref, source in resolved.items()}
    return merge_config.replace_strings(raw, mapping), list({s.path: s for s in resolved.values()}.values())


def validate(raw: dict):
    """Validate with mergekit's own types: `MoEMergeConfig` for a mixture of experts (mergekit-moe: `experts`), else
    `MergeConfiguration`, the method registry and its input contract."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry
    from pydantic import ValidationError

    if "experts" in raw:
        return validate_moe(raw)
    try:
        merge_config = MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, ValueError) as err:
        raise UserError(
            f"mergekit rejected the merge config: {_short(err)}. Fix: correct the merge group "
            "(see conf/merge/ and mergekit's docs) or your merge.config_file."
        ) from None
    known = sorted(m.spec.name for m in registry.registered_methods())
    if merge_config.merge_method not in known:
        raise UserError(
            f"Unknown merge method '{merge_config.merge_method}'. Fix: use one of mergekit's methods: "
            f"{', '.join(known)} (e.g. +merge=slerp)."
        )
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
        raise UserError(
            f"Merge method '{spec.name}' has no parameter(s) {unknown}. Fix: use its parameters: "
            f"{sorted(known) or 'none'}."
        )
    if merge_config.models:
        for p in spec.parameters:
            top = p.name in (merge_config.parameters or {})
            if p.required and not top and p.scope.value == "shared":
                raise UserError(
                    f"Merge method '{spec.name}' needs parameter '{p.name}'. Fix: set "
                    f"merge.parameters.{p.name}=<value>."
                )


def _check_inputs(merge_config, spec) -> None:
    if not merge_config.models:
        return  # slices and modules are checked by mergekit while planning
    ids = [str(m.model) for m in merge_config.models]
    base = str(merge_config.base_model) if merge_config.base_model else None
    if spec.contract.base.value == "required" and base is None:
        raise UserError(
            f"Merge method '{spec.name}' needs a base model and none is set. Fix: set "
            "models.base=<folder or hub id> (with models=local) or base_model in your mergekit YAML."
        )
    if base is not None and base not in ids and spec.contract.base.value != "ignored":
        ids.append(base)  # mergekit adds the base model to the inputs the same way
    try:
        spec.contract.validate_ids(ids, base)
    except ValueError as err:
        raise UserError(
            f"Merge method '{spec.name}' cannot merge these models: {err}. Fix: adjust models.parents "
            f"/ models.base or the models list ({len(ids)} inputs given)."
        ) from None


def validate_moe(raw: dict):
    """A mixture of experts, validated by mergekit-moe's own `MoEMergeConfig` and `is_bad_config`."""
    from mergekit.moe.config import MoEMergeConfig, is_bad_config
    from pydantic import ValidationError

    fix = (
        "Fix: correct your mergekit-moe YAML: base_model, and experts, each with source_model and (unless "
        "gate_mode is random or uniform_random) positive_prompts (see conf/merge/moe.yaml)."
    )
    try:
        config = MoEMergeConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"mergekit-moe rejected the MoE config: {_short(err)}. {fix}") from None
    if config.gate_mode not in GATE_MODES:
        raise UserError(f"mergekit-moe has no gate_mode {config.gate_mode!r}. Fix: use one of {', '.join(GATE_MODES)}.")
    with mergekit_says() as said:
        bad = is_bad_config(config)
    if bad:
        raise UserError(f"mergekit-moe refused the MoE config: {' '.join(said)} {fix}")
    return config


@contextmanager
def mergekit_says(level: int = logging.WARNING):
    """The messages mergekit logs meanwhile (at `level` and above): mergekit-moe explains a refusal in log lines."""
    said = []
    handler = logging.Handler(level)
    handler.emit = lambda record: said.append(record.getMessage())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield said
    finally:
        root.removeHandler(handler)


def check_compatible(config, options) -> None:
    """Parents must share the architecture and, for every tensor they share, its shape; a mixture of experts needs
    an output architecture of mergekit-moe's for them."""
    from safetensors import safe_open

    vocab_rebuilt = getattr(config, "tokenizer_source", None) is not None or getattr(config, "tokenizer", None)
    archs, shapes = {}, {}
    for ref in ordered_references(config):
        folder = Path(ref.model.path)
        archs[folder] = tuple(json.loads((folder / "config.json").read_text()).get("architectures") or [])
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    shapes.setdefault(name, {})[folder] = tuple(handle.get_slice(name).get_shape())
    if len(set(archs.values())) > 1 and not options.allow_crimes:
        listing = "; ".join(f"{f.name}: {'/'.join(a) or '?'}" for f, a in archs.items())
        raise UserError(
            f"The models have different architectures ({listing}). Fix: merge checkpoints of one "
            "architecture (fine-tunes of the same base), or set merge_options.allow_crimes=true "
            "if you really mean to mix them."
        )
    for name, by_model in shapes.items():
        if len(set(by_model.values())) > 1:
            if vocab_rebuilt and ("embed" in name or "lm_head" in name):
                continue  # mergekit re-maps vocabularies when a tokenizer source is set
            listing = "; ".join(f"{f.name}: {list(s)}" for f, s in by_model.items())
            raise UserError(
                f"Tensor shapes differ between the models for '{name}' ({listing}). Fix: merge "
                "fine-tunes of the same base model (same hidden size, heads and vocabulary)."
            )
    if is_moe(config):
        moe_architecture(config, options)


def moe_architecture(config, options) -> str:
    """The output architecture mergekit-moe builds from these experts (Mixtral for Llama and Mistral experts)."""
    from mergekit.scripts.moe import select_output_arch

    with mergekit_says() as said:
        try:
            return select_output_arch(config, options, verbose=True).name()
        except SystemExit:  # mergekit-moe's way of saying none fits
            raise UserError(
                f"mergekit-moe has no output architecture for these experts: {' '.join(said)} Fix: "
                "experts and base model of one architecture that mergekit-moe builds a mixture from "
                "(Llama or Mistral: Mixtral; Qwen2: Qwen MoE; Qwen3; DeepSeek), or set its "
                "`architecture:` field."
            ) from None


def build_options(section: DictConfig):
    """mergekit's MergeOptions from `merge_options` (`cuda: auto`: the GPU where torch sees one)."""
    from mergekit.merge import MergeOptions
    from pydantic import ValidationError

    given = OmegaConf.to_container(section, resolve=True)
    clash = sorted(set(given) & set(FIXED_OPTIONS))
    if clash:
        raise UserError(f"merge_options.{clash[0]} is fixed by merge-anneal ({FIXED_OPTIONS}). Fix: drop it.")
    if given.get("cuda") == "auto":
        import torch

        given["cuda"] = torch.cuda.is_available()
    try:
        return MergeOptions(**given, **FIXED_OPTIONS)
    except ValidationError as err:
        raise UserError(
            f"Invalid merge_options: {_short(err)}. Fix: use mergekit's MergeOptions fields "
            "(see conf/merge_options/default.yaml; cuda takes auto, true or false)."
        ) from None


def is_moe(config) -> bool:
    return hasattr(config, "experts")


def method_name(config) -> str:
    """The merge method's name (`moe` for mergekit-moe's mixture of experts)."""
    return "moe" if is_moe(config) else config.merge_method


def ordered_references(config, with_base: bool = True) -> list:
    """The models in the order the config lists them (mergekit's referenced_models() is a set, whose
    order changes with PYTHONHASHSEED); the base model last unless listed. A mixture of experts: its experts."""
    if is_moe(config):
        listed = [e.source_model for e in [*config.experts, *(config.shared_experts or [])]]
    else:
        listed = [m.model for m in config.models or []]
        for out_slice in config.slices or []:
            listed += [source.model for source in out_slice.sources]
        for module in (config.modules or {}).values():
            listed += [m.model for m in module.models or []]
            listed += [source.model for s in module.slices or [] for source in s.sources]
    if with_base and config.base_model:
        listed.append(config.base_model)
    return list(dict.fromkeys(listed))


def parents_in_order(config) -> list[str]:
    """The merged models' folders in the order the config lists them (the base model only where listed)."""
    return list(dict.fromkeys(str(ref.model.path) for ref in ordered_references(config, with_base=False)))


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:600]
