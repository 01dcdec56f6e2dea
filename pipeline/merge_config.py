"""A mergekit configuration as merge-anneal reads it before mergekit does (no mergekit import: the app reads it to
know which models a run merges, before any stage runs): its YAML documents, the models it names, and for a
mergekit-multi chain the order its merges run in and the YAML of each merge's lineage."""

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import UserError

log = logging.getLogger(__name__)

# Where a mergekit config names a model: models[].model, base_model, slices' and modules' sources (mergekit-yaml);
# base_model and experts[].source_model (mergekit-moe).
MODEL_KEYS = ("model", "base_model", "source_model")


def model_references(raw) -> tuple[list[str], list[str]]:
    """The models a mergekit config (one document, or a list of them) names, as written and in order
    (`model+lora`: both; a chain's own intermediates, named by another document, are not models), and the local
    folders its `tokenizer_source` names; read from the config alone (no mergekit import, nothing resolved)."""
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
    chain = {doc.get("name") for doc in raw if isinstance(doc, dict)} if isinstance(raw, list) else set()
    return [m for m in dict.fromkeys(named) if m not in chain], list(dict.fromkeys(tokenizers))


def load(cfg: DictConfig) -> list[dict]:
    """The mergekit configuration as plain dicts, one per YAML document: the `merge` group itself, or the documents
    of the file it names (several: a mergekit-multi chain)."""
    try:
        if "config_file" not in cfg.merge:
            return [OmegaConf.to_container(cfg.merge, resolve=True)]
        path = Path(cfg.merge.config_file).expanduser()
    except OmegaConfBaseException as err:
        raise UserError(
            f"The merge config cannot be resolved: {err.msg if hasattr(err, 'msg') else err}. Fix: "
            "with models=local, set models.parents=[...] (and models.base=... for methods with a "
            "base model; models.expert_prompts=[[...],[...]] for +merge=moe); with +merge=custom, set "
            "merge.config_file=PATH."
        ) from None
    if not path.is_file():
        raise UserError(
            f"merge.config_file {path} does not exist. Fix: pass the path of your mergekit YAML, "
            "e.g. +merge=custom merge.config_file=examples/merge.yml."
        )
    try:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({' '.join(str(err).split())}). Fix: correct the file.") from None
    if not docs or not all(isinstance(doc, dict) for doc in docs):
        raise UserError(
            f"{path} does not hold a mergekit configuration (a YAML mapping with merge_method, or "
            "base_model and experts for mergekit-moe; several, separated by ---, for a mergekit-multi "
            "chain). Fix: point merge.config_file at a mergekit YAML."
        )
    return docs


def replace_strings(node, mapping: dict, keys: tuple | None = None, key=None):
    """`node` with every string that `mapping` has (or `model+lora` whose parts it has) replaced; with `keys`, only
    the values of those keys."""
    if isinstance(node, dict):
        return {k: replace_strings(v, mapping, keys, k) for k, v in node.items()}
    if isinstance(node, list):
        return [replace_strings(v, mapping, keys, key) for v in node]
    if isinstance(node, str) and (keys is None or key in keys):
        if "+" in node and all(part in mapping for part in node.split("+")):  # model+lora
            return "+".join(mapping[part] for part in node.split("+"))
        return mapping.get(node, node)
    return node


@dataclass
class Step:
    """One merge of the config: its document (`name` removed) and the folder its output goes to."""

    name: str | None  # a chain's intermediate (mergekit-multi's `name`); None: the final merge
    raw: dict
    out_dir: Path
    after: tuple = ()  # the names of the intermediates it reads


def plan(docs: list[dict], intermediates_dir: Path, out_dir: Path) -> list[Step]:
    """The merges of the config, in the order they run, the final one last: one document is one merge; several
    are a mergekit-multi chain, where a document's `name` used as a model by another stands for its output."""
    import graphlib
    import re

    if len(docs) == 1 and "name" not in docs[0]:
        return [Step(None, docs[0], out_dir)]
    docs = [dict(doc) for doc in docs]
    names = [doc.pop("name", None) for doc in docs]
    fix = (
        "Fix: give every intermediate merge a unique `name:` (a folder name), used as a model by later documents, "
        "and leave the final merge unnamed, as mergekit-multi reads it."
    )
    if names.count(None) > 1:
        raise UserError(
            f"The merge config has {names.count(None)} documents without a `name:`; a chain "
            f"(mergekit-multi) has at most one, the final merge. {fix}"
        )
    bad = [n for n in names if n is not None and not re.fullmatch(r"[A-Za-z0-9_][\w.-]*", str(n))]
    twice = sorted({n for n in names if n is not None and names.count(n) > 1})
    if bad or twice:
        raise UserError(
            f"The chain's merge names {bad or twice} are {'not folder names' if bad else 'used twice'}. {fix}"
        )
    folders = {n: str(intermediates_dir / n) for n in names if n is not None}
    uses = {n: [u for u in model_references(doc)[0] if u in folders] for n, doc in zip(names, docs)}
    users = {u for used in uses.values() for u in used}
    final = None if None in names else [n for n in names if n not in users]
    if isinstance(final, list):
        if len(final) != 1:
            raise UserError(
                f"The chain's merges {final} are each used by no other document, so which one to anneal "
                f"is unclear. {fix}"
            )
        final = final[0]
    try:
        order = list(graphlib.TopologicalSorter({n: uses[n] for n in names}).static_order())
    except graphlib.CycleError as err:
        raise UserError(
            f"The chain's merges use each other in a circle ({' -> '.join(map(str, err.args[1]))}). {fix}"
        ) from None
    needed = ancestry(uses, final)
    skipped = [n for n in names if n not in needed]
    if skipped:
        log.warning(f"merge: the chain's merges {skipped} are not used by the final merge; not merged")
    by_name = dict(zip(names, docs))
    return [
        Step(
            None if n == final else n,
            replace_strings(by_name[n], folders, keys=MODEL_KEYS),
            out_dir if n == final else intermediates_dir / n,
            tuple(uses[n]),
        )
        for n in order
        if n in needed
    ]


def lineage_base(configs: list, steps: list[Step], base_of) -> str | None:
    """The base model of the merge's lineage: the final merge's base, followed through intermediates (a chain whose
    final merge builds on an intermediate has the base of that intermediate)."""
    made = {str(step.out_dir): config for step, config in zip(steps, configs)}
    base = base_of(configs[-1])
    while base in made:
        base = base_of(made[base])
    return base


def chain_yaml(steps: list[Step], configs: list, step: Step, yaml_text) -> str:
    """The YAML written beside a merge's output: its resolved config, and for a chain's merge the documents of the
    intermediates it reads first (each with its `name`, intermediates shown by name), as mergekit-multi takes them."""
    names = {str(s.out_dir): s.name for s in steps if s.name}
    made = dict(zip((s.name for s in steps), configs))
    needed = ancestry({s.name: s.after for s in steps}, step.name)
    docs = [(f"name: {s.name}\n" if s.name else "") + yaml_text(made[s.name], names) for s in steps if s.name in needed]
    return "\n---\n".join(docs)


def ancestry(uses: dict, name) -> set:
    """`name` and every merge it reads, directly or through others (`uses`: each merge's intermediates)."""
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo += uses[current]
    return found
