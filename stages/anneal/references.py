"""Which policy anchors the loss: the merge's base model, else its first parent (`anneal.reference` picks
another: a parent by name or index, `merged`, any folder or hub id), or every parent (`parents`, their log-probs
combined per pair by `anneal.reference_combine`). Decided from the settings and the merge record before any data
or model is loaded.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import UserError, models, records
from stages.anneal.settings import AnnealSettings


@dataclass(frozen=True)
class References:
    """The reference policy or policies: `sources` by name (one; with `parents` every parent by folder name),
    `choice` (what was chosen: `parents`, or the model reference), `label` (how: base_model, parent:<i or name>,
    merged, explicit, parents:<combination>)."""

    choice: str
    label: str
    sources: dict[str, records.ModelSource]

    @property
    def parents(self) -> bool:
        return self.choice == "parents"

    @property
    def first(self) -> records.ModelSource:
        """The one reference; with `parents`, the first parent (eval's KL anchor)."""
        return next(iter(self.sources.values()))

    def fingerprints(self, first: str) -> tuple[str, dict[str, str]]:
        """What the stored log-probs depend on (`first`: the first source's fingerprint, computed already), and each
        source's fingerprint by name; with `parents`, a digest of every parent's and the combination."""
        each = {
            name: first if source is self.first else models.fingerprint(source.path)
            for name, source in self.sources.items()
        }
        if not self.parents:
            return first, each
        return hashlib.sha256(json.dumps([each, self.label], sort_keys=True).encode()).hexdigest(), each


def choose(anneal: AnnealSettings, merge: records.MergeRecord) -> References:
    """The references of this anneal, from its settings and the merge's record."""
    if str(anneal.reference) == "parents":  # every parent scores every pair; combined per pair
        by_name = check_parents_reference(merge.inputs.parents)
        return References(
            "parents",
            f"parents:{anneal.reference_combine}",
            {name: merge.source(path) for name, path in by_name.items()},
        )
    choice, label = choose_reference(
        anneal.reference, merge.inputs.parents, merge.inputs.base_model, Path(merge.outputs.model)
    )
    source = merge.source(choice) if choice in merge.inputs.models else models.resolve(choice)
    return References(choice, label, {label: source})


def choose_reference(choice, parents: list[str], base: str | None, merged_dir: Path) -> tuple[str, str]:
    """The reference policy and how it was chosen: `auto` (merge base model, else first parent), a parent name or
    index, `merged` (only when asked for by name), or any folder / hub id."""
    choice = "auto" if choice is None else str(choice)
    if choice == "auto":
        return (base, "base_model") if base else (parents[0], "parent:0")
    if choice == "merged":
        return str(merged_dir), "merged"
    if choice.isdigit():
        index = int(choice)
        if index >= len(parents):
            raise UserError(
                f"anneal.reference={index} but the merge has {len(parents)} parents. Fix: use an index "
                f"below {len(parents)}, a parent name ({', '.join(Path(p).name for p in parents)}), "
                "auto, merged, or a model folder."
            )
        return parents[index], f"parent:{index}"
    by_name = {Path(p).name: p for p in [*parents, *([base] if base else [])]}
    if choice in by_name:
        return by_name[choice], f"parent:{choice}"
    return choice, "explicit"


def check_parents_reference(parents: list[str]) -> dict[str, str]:
    """`anneal.reference=parents`: the parents by folder name; a merge of fewer than two is refused."""
    by_name = {Path(p).name: p for p in parents}
    if len(by_name) < 2:
        raise UserError(
            f"anneal.reference=parents needs a merge of at least two parents; this merge has "
            f"{list(by_name) or 'none'}. Fix: name that parent (anneal.reference={next(iter(by_name), 0)}) "
            "or use anneal.reference=auto."
        )
    return by_name


def route_of(pairs, column: str, names: list[str]) -> dict:
    """Per split, each pair's parent index from data column `column` (a parent's folder name or index), checked
    before any model is loaded."""
    routes = {}
    for split, ds in pairs.items():
        if column not in ds.column_names:
            raise UserError(
                f"anneal.reference_combine=route reads each pair's parent from the data column "
                f"{column!r} (anneal.reference_route), which the {split} pairs do not have (columns: "
                f"{ds.column_names}). Fix: set anneal.reference_route to a column naming a parent of "
                f"{names}, or use reference_combine=mean or max."
            )
        values = [str(v) for v in ds[column]]
        lookup = {**{n: i for i, n in enumerate(names)}, **{str(i): i for i in range(len(names))}}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise UserError(
                f"The data column {column!r} (anneal.reference_route) names {unknown[:5]}, which are not "
                f"parents of this merge ({names}, or their indices 0-{len(names) - 1}). Fix: map that "
                "column's values to parent names, or use reference_combine=mean or max."
            )
        routes[split] = [lookup[v] for v in values]
    return routes
