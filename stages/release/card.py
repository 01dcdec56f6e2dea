"""The release's model card (huggingface_hub's `ModelCard`): front matter (base models, tags, data sets, license,
`model-index` from the eval metrics) and a body with the lineage, the merged-versus-annealed table and the commands
that reproduce the run. Local paths appear in public files only as folder names (hub downloads as their hub ids).
"""

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import models, records
from stages.release.settings import ReleaseSettings

# Overrides that say where caches live, not what is computed: left out of the reproducing command.
LOCATION_KEYS = ("pipeline.cache_dir", "models.cache_dir", "pipeline.resume")
LOCAL = "<local>"  # stands for a folder on the machine that made the release
DEMO_DATASET = "merge-anneal-demo"
LOWER_IS_BETTER = ("kl_to_reference", "perplexity", "perplexity_heldout_chosen")
MERGE_CONFIG_NAME, DPO_NAME = "mergekit_config.yml", "dpo_settings.yaml"


class PublicNames:
    """How local paths appear in public files, from the models' provenance (`ModelSource`, recorded when each
    was resolved): a hub download by its hub id (with `@<commit>` where asked), anything else by its own name."""

    def __init__(self, sources: list[records.ModelSource]):
        self.sources = {source.path: source for source in sources}

    def is_hub(self, ref: str) -> bool:
        source = self.sources.get(ref)
        return bool(source and source.hub_id) or models.is_hub_id(ref)

    def name(self, ref: str, revision: bool = False) -> str:
        if "+" in ref and all(Path(p).is_absolute() for p in ref.split("+")):  # mergekit's model+lora
            return "+".join(self.name(p, revision) for p in ref.split("+"))
        if ref in self.sources:
            return self.sources[ref].public_name(revision)
        if models.is_hub_id(ref):
            return ref if revision else ref.split("@")[0]
        return Path(ref).name if Path(ref).expanduser().is_absolute() else ref

    def public(self, node):
        """A config with every local path replaced by its public name (hub downloads: `org/name@<commit>`)."""
        if isinstance(node, dict):
            return {k: self.public(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.public(v) for v in node]
        if isinstance(node, str) and node.startswith(("/", "~")):
            return self.name(node, revision=True)
        return node


def describe_lineage(merge: records.MergeRecord, anneal: records.AnnealRecord, names: PublicNames) -> dict:
    parents, base = merge.inputs.parents, merge.inputs.base_model
    inputs = [*parents, *([base] if base and base not in parents else [])]
    reference = anneal.inputs.reference_source or records.ModelSource(path=anneal.inputs.reference_path)
    return {
        "method": merge.merge_method,
        "parents": [names.name(p) for p in parents],
        "base": names.name(base) if base else None,
        "base_model": [names.name(p) for p in inputs],
        "hub": {names.name(p): names.is_hub(p) for p in inputs},
        "revisions": {
            names.name(p): names.sources[p].revision for p in inputs if p in names.sources and names.sources[p].revision
        },
        "reference": {
            "model": "the merged model itself"
            if anneal.inputs.reference_label == "merged"
            else " + ".join(names.name(p["path"]) for p in anneal.inputs.references.values())
            + f" (log-probs combined by {anneal.config.anneal.reference_combine})"
            if anneal.inputs.references
            else names.name(reference.path)
            if reference.path in names.sources
            else names.name(anneal.inputs.reference),
            "chosen_as": anneal.inputs.reference_label,
            "setting": anneal.config.anneal.reference,
        },
        "mergekit_version": merge.mergekit_version,
        # each merge, in the order they ran (a mergekit-multi chain's intermediates first, by name)
        "steps": [
            {"name": s.name, "method": s.merge_method, "models": [names.name(m) for m in s.models]} for s in merge.chain
        ]
        or [{"name": None, "method": merge.merge_method, "models": None}],
        "architecture": (
            json.loads((Path(merge.outputs.model) / "config.json").read_text()).get("architectures") or ["?"]
        )[0].removesuffix("ForCausalLM"),
        "data": anneal.inputs.data,
        "data_source": anneal.config.data.source,
        "pairs": anneal.data,
        "versions": anneal.versions,
    }


def datasets(lineage: dict) -> list[str]:
    """The card's `datasets`: hub ids of the preference data, file names of local files, the demo's name."""
    if lineage["data_source"] == "demo":
        return [DEMO_DATASET]
    return list(dict.fromkeys(PublicNames([]).name(str(ref)) for ref in lineage["data"].values() if ref))


def reproduce_commands(invocations: list[dict], names: PublicNames) -> list[str]:
    """The `python -m pipeline ...` lines that made the release, oldest first: the latest invocation that ran
    each stage (one line when one command did everything). Cache locations are left out and local paths
    shown as `<local>/<name>`. Empty when a stage ran without a recorded command (driven from Python)."""
    latest = {stage: i for i, inv in enumerate(invocations) for stage in inv["stages"]}
    if not {"merge", "anneal", "eval", "release"} <= set(latest):
        return []
    chosen = sorted({latest[s] for s in ("merge", "anneal", "eval", "release")})
    lines = []
    for i in chosen:
        kept = [o for o in invocations[i]["overrides"] if o.split("=", 1)[0].lstrip("+~") not in LOCATION_KEYS]
        kept += ["hydra.run.dir=<run>"] if len(chosen) > 1 else []
        lines.append(" ".join(["python -m pipeline", *(shlex.quote(public_override(o, names)) for o in kept)]))
    return lines


def public_override(override: str, names: PublicNames) -> str:
    """An override with each absolute path replaced by `<local>/<its name>` (hub downloads by their hub id)."""

    def replace(match):
        ref = match.group(0)
        return names.name(ref, revision=True) if names.is_hub(ref) else f"{LOCAL}/{names.name(ref)}"

    return re.sub(r"(?<![\w.-])[~/][^\s,\[\]{}()'\"]*", replace, override)


@dataclass(frozen=True)
class CardContent:
    """What the model card says: the release's name, which model and why (`pick`), the lineage, the eval report,
    the merge documents and DPO settings as published, the reproducing commands, the release settings."""

    name: str
    pick: dict
    lineage: dict
    evaluation: records.EvalReport
    merge_docs: list[dict]
    dpo_settings: dict
    commands: list[str]
    release: ReleaseSettings


def model_card(card: CardContent):
    """huggingface_hub's ModelCard: front matter (ModelCardData with the picked model's metrics) and the body."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name, lineage, evaluation, release = card.name, card.lineage, card.evaluation, card.release
    picked = evaluation.models[card.pick["picked"]]
    dataset = datasets(lineage)[-1]
    held_out = [
        EvalResult(
            task_type="text-generation",
            task_name="held-out preference pairs",
            dataset_type=dataset,
            dataset_name=f"held-out preference pairs ({evaluation.heldout_pairs})",
            dataset_split="heldout",
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in picked.scalars().items()
        if not metric.startswith("benchmarks/")
    ]
    tasks = (evaluation.benchmarks or {}).get("tasks", {})
    benchmark_results = [  # each lm-eval task on the suite's items, by its own metric
        EvalResult(
            task_type="text-generation",
            task_name=task,
            dataset_type=task,
            dataset_name=f"{task} ({tasks[task]['items']} items)",
            metric_type=tasks[task]["metric"],
            metric_value=value,
        )
        for task, value in picked.benchmarks.items()
    ]
    data = ModelCardData(
        model_name=name,
        base_model=lineage["base_model"],
        datasets=datasets(lineage),
        license=release.license,
        language=release.language,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["merge", "mergekit", lineage["method"], "dpo", "trl", "merge-anneal"],
        eval_results=held_out + benchmark_results,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{card_body(card)}")


def _fmt(value: float, signed: bool = False) -> str:
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _with_ci(value: float, ci, signed: bool = False) -> str:
    return f"{_fmt(value, signed)} [{_fmt(ci[0], signed)}, {_fmt(ci[1], signed)}]"


def metrics_table(evaluation: records.EvalReport) -> list[str]:
    merged, annealed = evaluation.models["merged"], evaluation.models["annealed"]
    lines = ["| metric | merged | annealed | annealed - merged |", "|---|---|---|---|"]
    for metric in annealed.scalars():
        if merged.value(metric) is None:
            continue
        cells = [_with_ci(m.value(metric), m.interval(metric)) for m in (merged, annealed)]
        delta = evaluation.delta(metric)
        change = _with_ci(delta["delta"], delta["ci95"], signed=True) if delta else ""
        if delta and "ratio" in delta:
            change += f"; ratio {_with_ci(delta['ratio'], delta['ratio_ci95'])}"
        label = f"{metric} (lower is better)" if metric in LOWER_IS_BETTER else metric
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {change} |")
    return lines


def card_body(card: CardContent) -> str:
    lineage, evaluation, pick, name = card.lineage, card.evaluation, card.pick, card.name
    method, reference = card.dpo_settings["anneal"]["method"], lineage["reference"]
    what = (
        f"the annealed model: the merge after {method.upper()}"
        if pick["picked"] == "annealed"
        else f"the merged model, before {method.upper()}"
    )
    bootstrap, link = evaluation.bootstrap, lambda model: model_link(lineage, model)
    lines = [
        f"# {name}",
        "",
        f"A [mergekit](https://github.com/arcee-ai/mergekit) {merge_phrase(lineage)} of "
        f"{', '.join(link(p) for p in lineage['parents'])}, annealed with a short "
        + (
            f"DPO run ([TRL](https://github.com/huggingface/trl)) against the unmerged `{reference['model']}`"
            if method == "dpo"
            else f"reference-free {method.upper()} run ([TRL](https://github.com/huggingface/trl))"
        )
        + ", and evaluated against the merge on held-out preference pairs, by merge-anneal.",
        "",
        f"**Verdict.** {evaluation.verdict['sentence']}",
        "",
        f"This release is {what} ({pick['reason']}).",
        "",
        *lineage_section(lineage, card.merge_docs, card.dpo_settings),
        "## Evaluation",
        "",
        f"{evaluation.heldout_pairs} held-out preference pairs, never trained on. Each value has a 95% "
        f"percentile bootstrap interval ({bootstrap['resamples']} resamples, seed {bootstrap['seed']}); "
        "annealed - merged is a paired bootstrap over the same items. Perplexity on "
        f"{PublicNames([]).name(evaluation.perplexity_on)}.",
        "",
        *metrics_table(evaluation),
        "",
        *reproduce_section(card.commands, lineage),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{card.release.repo_id or name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{card.release.repo_id or name}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def model_link(lineage: dict, model: str) -> str:
    if not lineage["hub"].get(model):
        return f"`{model}` (local)"
    revision = lineage.get("revisions", {}).get(model)
    return f"[{model}](https://huggingface.co/{model})" + (f" at commit `{revision}`" if revision else "")


def lineage_section(lineage: dict, merge_docs: list[dict], dpo_settings: dict) -> list[str]:
    """The card's lineage table (parents, base, each merge, the anneal, its reference, the data) and the configs."""
    anneal, reference, pairs = dpo_settings["anneal"], lineage["reference"], lineage["pairs"]
    trainer, method, method_args = anneal["trainer"], anneal["method"], anneal["method_args"]
    return [
        "## Lineage",
        "",
        "| step | what |",
        "|---|---|",
        *[f"| parent | {model_link(lineage, p)} |" for p in lineage["parents"]],
        *([f"| base model | {model_link(lineage, lineage['base'])} |"] if lineage["base"] else []),
        *merge_rows(lineage, merge_docs),
        f"| anneal | TRL {lineage['versions'].get('trl', '')} "
        + (
            f"DPO, loss {', '.join(trainer['loss_type'])}, beta {trainer['beta']}"
            if method == "dpo"
            else f"{method.upper()} (reference-free{''.join(f', {k} {v}' for k, v in sorted(method_args.items()))})"
        )
        + f", learning rate {trainer['learning_rate']} ({trainer['lr_scheduler_type']}), "
        f"{trainer['max_steps']} steps of {trainer['per_device_train_batch_size']} pairs, max length "
        f"{trainer['max_length']}, {'LoRA' if anneal['peft'] else 'all weights'} |",
        f"| {'DPO reference' if method == 'dpo' else 'reference (evaluation only)'} | `{reference['model']}` "
        f"(anneal.reference={reference['setting']}: {reference['chosen_as']}); its log-probs were computed once, "
        f"before training{'' if method == 'dpo' else ', and the loss did not read them'} |",
        f"| preference data | {', '.join(f'`{d}`' for d in datasets(lineage))}: {pairs['train_pairs']} training "
        f"pairs, {pairs['heldout_pairs']} held out |",
        "",
        f"The merge configuration is in `{MERGE_CONFIG_NAME}` and the DPO settings in `{DPO_NAME}`:",
        "",
        "```yaml",
        yaml.safe_dump_all(merge_docs, sort_keys=False).rstrip(),
        "```",
        "",
    ]


def reproduce_section(commands: list[str], lineage: dict) -> list[str]:
    lines = ["## Reproduce", ""]
    if not commands:
        return lines + [
            "Not recorded: part of this run was not started by `python -m pipeline` (it was driven from "
            "Python, or by an older merge-anneal)."
        ]
    return lines + [
        (
            "These commands, run in order in one run folder, made this release"
            if len(commands) > 1
            else "This command made this release"
        )
        + f" (merge-anneal {lineage['versions'].get('merge-anneal', '')}"
        f"; `{LOCAL}` stands for a folder on the machine that made it):",
        "",
        "```bash",
        *commands,
        "```",
    ]


def merge_phrase(lineage: dict) -> str:
    """What kind of merge, for the card's first sentence."""
    if lineage["method"] == "moe":
        return "mixture of experts (mergekit-moe)"
    if len(lineage["steps"]) > 1:
        return f"chain of {len(lineage['steps'])} merges (mergekit-multi) ending in a `{lineage['method']}` merge"
    return f"`{lineage['method']}` merge"


def merge_rows(lineage: dict, merge_docs: list[dict]) -> list[str]:
    """The lineage table's merge rows: one per merge of a chain (intermediates by name), in the order they ran."""
    version = f"mergekit {lineage['mergekit_version'] or ''}".rstrip()
    rows = []
    for step, doc in zip(lineage["steps"], merge_docs):
        label = f"merge `{step['name']}`" if step["name"] else "merge"
        if step["method"] == "moe":
            experts = doc.get("experts") or []
            what = (
                f"{version} (mergekit-moe): a {lineage['architecture']} mixture of {len(experts)} experts, "
                f"{doc.get('experts_per_token')} per token, gate_mode {doc.get('gate_mode')}"
            )
        else:
            inputs = f" of {', '.join(f'`{m}`' for m in step['models'])}" if step["models"] else ""
            parameters = ", ".join(f"{k}={v}" for k, v in (doc.get("parameters") or {}).items())
            what = f"{version} `{step['method']}`{inputs}{', ' + parameters if parameters else ''}"
        rows.append(f"| {label} | {what} |")
    return rows
