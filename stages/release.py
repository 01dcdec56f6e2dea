"""Stage 4, release: the chosen model, ready to share, in `<run_dir>/release/<name>/`; `release=hub` pushes it.

The folder holds the annealed model (or the merged one, or the better of the two by an eval metric):
safetensors weights, config, generation config, tokenizer and chat template, the resolved
`mergekit_config.yml`, the DPO settings (`dpo_settings.yaml`) and a `README.md` model card written with
huggingface_hub's `ModelCard`: front matter (base models, tags, data sets, license, `model-index` from the
eval metrics) and a body with the lineage, the merged-versus-annealed table and the commands that reproduce
the run. Everything is read through the manifest. Local paths appear in public files only as folder names
(hub downloads as their hub ids), and no token is ever written.
"""

import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, artifacts, manifest, models, records

log = logging.getLogger(__name__)

PICKS = ("annealed", "merged", "best")
LOWER_IS_BETTER = ("kl_to_reference", "perplexity", "perplexity_heldout_chosen")
# What a release takes from the chosen model folder: weights (safetensors only), config, generation config,
# tokenizer files and chat template(s). Nothing else (no optimizer state, no pickles, no stray files).
MODEL_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.jinja",
               "chat_template.json")
TEMPLATE_DIR = "additional_chat_templates"
CARD_NAME, MERGE_CONFIG_NAME, DPO_NAME = "README.md", "mergekit_config.yml", "dpo_settings.yaml"
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # huggingface_hub's own environment variables
# Overrides that say where caches live, not what is computed: left out of the reproducing command.
LOCATION_KEYS = ("pipeline.cache_dir", "models.cache_dir", "pipeline.resume")
LOCAL = "<local>"  # stands for a folder on the machine that made the release
DEMO_DATASET = "merge-anneal-demo"


def run(cfg: DictConfig, run_dir: Path) -> records.ReleaseRecord:
    """Write the release folder (and push it with release=hub); returns the stage's record."""
    run_dir = Path(run_dir).resolve()
    release = cfg.release
    check_config(release)
    token = hub_token() if release.publish and not release.dry_run else None

    merge = records.load(run_dir, records.MergeRecord)
    anneal = records.load(run_dir, records.AnnealRecord)
    evaluation = records.load(run_dir, records.EvalRecord)
    merged_dir, annealed_dir = Path(merge.outputs.model), Path(anneal.outputs.model)
    metrics_path = Path(evaluation.outputs.metrics)
    metrics = json.loads(metrics_path.read_text())
    pick = choose(release, metrics)
    model_dir = annealed_dir if pick["picked"] == "annealed" else merged_dir
    check_weights(model_dir)
    name = release.name or f"{merge.merge_method}-{pick['picked']}"
    check_name(name)
    log.info(f"release: {pick['picked']} model ({pick['reason']})")

    names = PublicNames([*merge.inputs.sources, *([anneal.inputs.reference_source]
                                                  if anneal.inputs.reference_source else [])])
    lineage = describe_lineage(merge, anneal, names)
    commands = reproduce_commands(manifest.load(run_dir).get("commands", []), names)
    # one document per merge (a mergekit-multi chain: each intermediate, then the final merge)
    merge_docs = [names.public(doc) for doc in yaml.safe_load_all(Path(merge.outputs.config).read_text())]
    dpo_settings = names.public({"anneal": anneal.config.anneal.model_dump(mode="json"),
                                 "reference": lineage["reference"],
                                 "data": {**anneal.data, "sources": anneal.inputs.data}})
    card = model_card(name, pick, lineage, metrics, merge_docs, dpo_settings, commands, release)
    private = secrets() + [str(run_dir), str(Path.home()), str(Path(cfg.pipeline.cache_dir).expanduser().resolve()),
                           str(Path(cfg.models.cache_dir).expanduser().resolve())]
    out_dir = run_dir / "release" / name

    def write(tmp: Path) -> None:
        copy_model(model_dir, tmp)
        (tmp / MERGE_CONFIG_NAME).write_text(
            "# The resolved mergekit configuration of this merge; local model folders are shown by name.\n"
            + yaml.safe_dump_all(merge_docs, sort_keys=False))
        (tmp / DPO_NAME).write_text("# The anneal stage's DPO settings (TRL DPOConfig field names under trainer).\n"
                                    + yaml.safe_dump(dpo_settings, sort_keys=False))
        card.save(tmp / CARD_NAME)
        check_loads(tmp)
        check_public(tmp, private)

    artifacts.publish(out_dir, write)
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    log.info(f"release: {out_dir} ({len(files)} files)")
    hub = None
    if release.publish:
        message = release.commit_message or (f"Release {name}: the {pick['picked']} model of a "
                                             f"{lineage['method']} merge of {', '.join(lineage['parents'])} "
                                             "(merge-anneal)")
        hub = push(out_dir, files, release, message, token)
    return records.ReleaseRecord(
        inputs={"model": str(model_dir), "merged": str(merged_dir), "annealed": str(annealed_dir),
                "metrics": str(metrics_path), "mergekit_config": merge.outputs.config},
        outputs={"model": str(out_dir), "card": str(out_dir / CARD_NAME), "files": files},
        config={"release": OmegaConf.to_container(release, resolve=True)},
        pick=pick,
        commands=commands,
        **({"hub": hub} if hub is not None else {}),
    )


# ------------------------------------------------------------------------------------------------- checks

def check_config(release: DictConfig) -> None:
    """Config mistakes, caught before anything is read or written."""
    if release.pick not in PICKS:
        raise UserError(f"release.pick={release.pick} is not an option. Fix: choose annealed (the default), merged, "
                        "or best (the better of the two by release.objective), e.g. release.pick=best.")
    if release.publish and not release.get("repo_id"):
        raise UserError("release=hub needs the hub repository to push to, and release.repo_id is not set. Fix: add "
                        "release.repo_id=<your-name>/<model-name> (or drop release=hub to release locally only).")


def hub_token() -> str:
    """The hub token, from the environment only (never from a file, never written anywhere)."""
    for variable in TOKEN_VARIABLES:
        if os.environ.get(variable, "").strip():
            return os.environ[variable].strip()
    raise UserError("release=hub needs a Hugging Face token with write access, and HF_TOKEN is not set; nothing "
                    "was written or uploaded. Fix: export HF_TOKEN=<token> (https://huggingface.co/settings/tokens) "
                    "and run again, or add release.dry_run=true to see what would be pushed.")


def secrets() -> list[str]:
    """Token values present in the environment: they must never appear in a released file."""
    return [v.strip() for v in (os.environ.get(n, "") for n in TOKEN_VARIABLES) if len(v.strip()) >= 8]


def check_weights(model_dir: Path) -> None:
    """The chosen folder must hold safetensors weights and no pickled ones."""
    pickled = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickled or not any(model_dir.glob("*.safetensors")):
        found = f"pickled weights ({', '.join(pickled)})" if pickled else "no *.safetensors weights"
        raise UserError(f"The model to release, {model_dir}, holds {found}; merge-anneal releases safetensors only. "
                        "Fix: re-run the stage that wrote it (it saves safetensors), or convert the weights "
                        "(load with transformers and save_pretrained) and remove the .bin files.")


def check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) or ".." in name:
        raise UserError(f"release.name={name} is not a usable folder name. Fix: letters, digits, '-', '_' and '.', "
                        "e.g. release.name=my-merge.")


def check_loads(folder: Path) -> None:
    """The release loads with transformers: config, generation config and tokenizer (weights are copied as is)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    AutoConfig.from_pretrained(folder)
    GenerationConfig.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)


def check_public(folder: Path, private: list[str]) -> None:
    """No token and no local path of this machine in any released text file."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".safetensors"):
        text = file.read_text(errors="ignore")
        leaked = [s for s in private if len(s) > 1 and s in text]
        if leaked:  # a bug, never the user's doing: refuse to finish the folder
            what = "a token" if any(s in secrets() for s in leaked) else "a local path"
            raise RuntimeError(f"release: {file.name} would contain {what}; the release was not written")


# -------------------------------------------------------------------------------------------------- pick

def choose(release: DictConfig, metrics: dict) -> dict:
    """Which model to release, and why."""
    if release.pick != "best":
        return {"choice": release.pick, "picked": release.pick, "reason": f"release.pick={release.pick}"}
    objective = release.objective
    merged, annealed = (metric_value(metrics["models"][m], objective) for m in ("merged", "annealed"))
    if not all(isinstance(v, (int, float)) for v in (merged, annealed)):
        available = sorted(k for k, v in metrics["models"]["annealed"].items() if isinstance(v, (int, float)))
        skills = [f"skill_accuracy/{s}" for s in metrics["models"]["annealed"].get("skill_accuracy", {})]
        raise UserError(f"release.objective={objective} is not an eval metric of both the merged and the annealed "
                        f"model. Fix: use one of {', '.join(available + skills)}.")
    lower = objective.split("/")[0] in LOWER_IS_BETTER
    better_merged = merged < annealed if lower else merged > annealed
    picked = "merged" if better_merged else "annealed"
    comparison = metric_value(metrics["comparison"]["annealed_vs_merged"], objective)
    reason = (f"best by {objective}, {'lower' if lower else 'higher'} is better: annealed {annealed:.4g}, merged "
              f"{merged:.4g}" + ("; equal, so the annealed model (the default)" if merged == annealed else ""))
    if comparison:
        lo, hi = comparison["ci95"]
        reason += (f"; annealed - merged {comparison['delta']:+.4g}, 95% paired-bootstrap interval "
                   f"[{lo:+.4g}, {hi:+.4g}]" + (", which contains 0" if lo <= 0 <= hi else ""))
    return {"choice": "best", "picked": picked, "objective": objective, "higher_is_better": not lower,
            "values": {"merged": merged, "annealed": annealed}, "reason": reason}


def metric_value(table: dict, metric: str):
    """`metric` or `skill_accuracy/<skill>` from a metrics table; None where absent."""
    group, _, key = metric.partition("/")
    value = table.get(group)
    return value.get(key) if key and isinstance(value, dict) else (value if not key else None)


# ------------------------------------------------------------------------------------------ public names

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
        "revisions": {names.name(p): names.sources[p].revision for p in inputs
                      if p in names.sources and names.sources[p].revision},
        "reference": {"model": "the merged model itself" if anneal.inputs.reference_label == "merged"
                      else " + ".join(names.name(p["path"]) for p in anneal.inputs.references.values())
                      + f" (log-probs combined by {anneal.config.anneal.reference_combine})"
                      if anneal.inputs.references
                      else names.name(reference.path) if reference.path in names.sources
                      else names.name(anneal.inputs.reference),
                      "chosen_as": anneal.inputs.reference_label,
                      "setting": anneal.config.anneal.reference},
        "mergekit_version": merge.mergekit_version,
        # each merge, in the order they ran (a mergekit-multi chain's intermediates first, by name)
        "steps": [{"name": s.name, "method": s.merge_method, "models": [names.name(m) for m in s.models]}
                  for s in merge.chain] or [{"name": None, "method": merge.merge_method, "models": None}],
        "architecture": (json.loads((Path(merge.outputs.model) / "config.json").read_text()).get("architectures")
                         or ["?"])[0].removesuffix("ForCausalLM"),
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


# -------------------------------------------------------------------------------------------------- card

def model_card(name: str, pick: dict, lineage: dict, metrics: dict, merge_docs: list[dict], dpo_settings: dict,
               commands: list[str], release: DictConfig):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    picked = metrics["models"][pick["picked"]]
    dataset = datasets(lineage)[-1]
    results = [EvalResult(task_type="text-generation", task_name="held-out preference pairs", dataset_type=dataset,
                          dataset_name=f"held-out preference pairs ({metrics['heldout_pairs']})",
                          dataset_split="heldout", metric_type=metric, metric_value=value)
               for metric, value in flat_metrics(picked).items()]
    data = ModelCardData(
        model_name=name, base_model=lineage["base_model"], datasets=datasets(lineage), license=release.license,
        language=OmegaConf.to_container(release.language) if OmegaConf.is_list(release.language) else release.language,
        library_name="transformers", pipeline_tag="text-generation",
        tags=["merge", "mergekit", lineage["method"], "dpo", "trl", "merge-anneal"], eval_results=results)
    body = card_body(name, pick, lineage, metrics, merge_docs, dpo_settings, commands, release)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def flat_metrics(model_metrics: dict) -> dict:
    """A model's scalar metrics, skills as `skill_accuracy/<skill>`, in the eval file's order."""
    out = {k: v for k, v in model_metrics.items() if isinstance(v, (int, float))}
    out.update({f"skill_accuracy/{s}": v for s, v in model_metrics.get("skill_accuracy", {}).items()})
    return out


def _fmt(value: float, signed: bool = False) -> str:
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _with_ci(value: float, ci, signed: bool = False) -> str:
    return f"{_fmt(value, signed)} [{_fmt(ci[0], signed)}, {_fmt(ci[1], signed)}]"


def metrics_table(metrics: dict) -> list[str]:
    merged, annealed = metrics["models"]["merged"], metrics["models"]["annealed"]
    comparison = metrics["comparison"]["annealed_vs_merged"]
    lines = ["| metric | merged | annealed | annealed - merged |", "|---|---|---|---|"]
    for metric in flat_metrics(annealed):
        if metric_value(merged, metric) is None:
            continue
        cells = [_with_ci(metric_value(m, metric), metric_value(m["ci95"], metric)) for m in (merged, annealed)]
        delta = metric_value(comparison, metric)
        change = _with_ci(delta["delta"], delta["ci95"], signed=True) if delta else ""
        if delta and "ratio" in delta:
            change += f"; ratio {_with_ci(delta['ratio'], delta['ratio_ci95'])}"
        label = f"{metric} (lower is better)" if metric in LOWER_IS_BETTER else metric
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {change} |")
    return lines


def card_body(name: str, pick: dict, lineage: dict, metrics: dict, merge_docs: list[dict], dpo_settings: dict,
              commands: list[str], release: DictConfig) -> str:
    def model_link(model: str) -> str:
        if not lineage["hub"].get(model):
            return f"`{model}` (local)"
        revision = lineage.get("revisions", {}).get(model)
        return f"[{model}](https://huggingface.co/{model})" + (f" at commit `{revision}`" if revision else "")

    trainer = dpo_settings["anneal"]["trainer"]
    method, method_args = dpo_settings["anneal"]["method"], dpo_settings["anneal"]["method_args"]
    reference = lineage["reference"]
    pairs = lineage["pairs"]
    bootstrap = metrics["bootstrap"]
    what = (f"the annealed model: the merge after {method.upper()}" if pick["picked"] == "annealed"
            else f"the merged model, before {method.upper()}")
    lines = [
        f"# {name}", "",
        f"A [mergekit](https://github.com/arcee-ai/mergekit) {merge_phrase(lineage)} of "
        f"{', '.join(model_link(p) for p in lineage['parents'])}, annealed with a short "
        + (f"DPO run ([TRL](https://github.com/huggingface/trl)) against the unmerged `{reference['model']}`"
           if method == "dpo" else f"reference-free {method.upper()} run ([TRL](https://github.com/huggingface/trl))")
        + ", and evaluated against the merge on held-out preference pairs, by merge-anneal.", "",
        f"This release is {what} ({pick['reason']}).", "",
        "## Lineage", "",
        "| step | what |", "|---|---|",
        *[f"| parent | {model_link(p)} |" for p in lineage["parents"]],
        *([f"| base model | {model_link(lineage['base'])} |"] if lineage["base"] else []),
        *merge_rows(lineage, merge_docs),
        f"| anneal | TRL {lineage['versions'].get('trl', '')} "
        + (f"DPO, loss {', '.join(trainer['loss_type'])}, beta {trainer['beta']}" if method == "dpo" else
           f"{method.upper()} (reference-free{''.join(f', {k} {v}' for k, v in sorted(method_args.items()))})")
        + f", learning rate {trainer['learning_rate']} ({trainer['lr_scheduler_type']}), "
        f"{trainer['max_steps']} steps of {trainer['per_device_train_batch_size']} pairs, max length "
        f"{trainer['max_length']}, {'LoRA' if dpo_settings['anneal']['peft'] else 'all weights'} |",
        f"| {'DPO reference' if method == 'dpo' else 'reference (evaluation only)'} | `{reference['model']}` "
        f"(anneal.reference={reference['setting']}: {reference['chosen_as']}); its log-probs were computed once, "
        f"before training{'' if method == 'dpo' else ', and the loss did not read them'} |",
        f"| preference data | {', '.join(f'`{d}`' for d in datasets(lineage))}: {pairs['train_pairs']} training "
        f"pairs, {pairs['heldout_pairs']} held out |", "",
        f"The merge configuration is in `{MERGE_CONFIG_NAME}` and the DPO settings in `{DPO_NAME}`:", "",
        "```yaml", yaml.safe_dump_all(merge_docs, sort_keys=False).rstrip(), "```", "",
        "## Evaluation", "",
        f"{metrics['heldout_pairs']} held-out preference pairs, never trained on. Each value has a 95% "
        f"percentile bootstrap interval ({bootstrap['resamples']} resamples, seed {bootstrap['seed']}); "
        "annealed - merged is a paired bootstrap over the same items. Perplexity on "
        f"{PublicNames([]).name(metrics['perplexity_on'])}.", "",
        *metrics_table(metrics), "",
        "## Reproduce", "",
    ]
    if commands:
        lines += [("These commands, run in order in one run folder, made this release" if len(commands) > 1
                   else "This command made this release")
                  + f" (merge-anneal {lineage['versions'].get('merge-anneal', '')}"
                  f"; `{LOCAL}` stands for a folder on the machine that made it):", "", "```bash", *commands, "```"]
    else:
        lines += ["Not recorded: part of this run was not started by `python -m pipeline` (it was driven from "
                  "Python, or by an older merge-anneal)."]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained(\"{release.get('repo_id') or name}\")",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{release.get('repo_id') or name}\")", "```", ""]
    return "\n".join(lines)


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
            what = (f"{version} (mergekit-moe): a {lineage['architecture']} mixture of {len(experts)} experts, "
                    f"{doc.get('experts_per_token')} per token, gate_mode {doc.get('gate_mode')}")
        else:
            inputs = f" of {', '.join(f'`{m}`' for m in step['models'])}" if step["models"] else ""
            parameters = ", ".join(f"{k}={v}" for k, v in (doc.get("parameters") or {}).items())
            what = f"{version} `{step['method']}`{inputs}{', ' + parameters if parameters else ''}"
        rows.append(f"| {label} | {what} |")
    return rows


# ------------------------------------------------------------------------------------------------- files

def copy_model(model_dir: Path, out_dir: Path) -> None:
    """Weights, config, generation config (written from the model config if missing), tokenizer, chat template.
    Weights are hard-linked where possible: a release costs no extra disk."""
    out_dir.mkdir(parents=True)
    for pattern in MODEL_FILES:
        for file in sorted(model_dir.glob(pattern)):
            if file.suffix == ".safetensors":
                _link_or_copy(file, out_dir / file.name)
            else:
                shutil.copy2(file, out_dir / file.name)
    if (model_dir / TEMPLATE_DIR).is_dir():
        shutil.copytree(model_dir / TEMPLATE_DIR, out_dir / TEMPLATE_DIR)
    if not (out_dir / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out_dir)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------------------------ publish

def push(out_dir: Path, files: list[str], release: DictConfig, message: str, token: str | None) -> dict:
    """Push the release folder to the hub (create_repo, then upload_folder); dry_run lists what it would push."""
    target = {"repo_id": release.repo_id, "revision": release.revision or "main", "private": release.private,
              "commit_message": message, "files": files, "dry_run": bool(release.dry_run)}
    if release.dry_run:
        log.info(f"release: dry run: would push {len(files)} files to {release.repo_id} (revision "
                 f"{target['revision']}{', private' if release.private else ''}) with the commit message "
                 f"\"{message}\":\n"
                 + "\n".join(f"  {name}  ({(out_dir / name).stat().st_size} bytes)" for name in files))
        log.info("release: dry run: nothing uploaded")
        return target
    from httpx2 import TransportError  # what huggingface_hub 2.4 raises when it cannot connect
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    unreachable = (TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    try:
        url = api.create_repo(release.repo_id, private=release.private, exist_ok=True)
        if release.revision:
            api.create_branch(release.repo_id, branch=release.revision, exist_ok=True)
    except unreachable as err:
        raise UserError(f"Could not reach the Hugging Face hub at {constants.ENDPOINT} ({type(err).__name__}: "
                        f"{err}); nothing was uploaded. The release folder {out_dir} is complete. Fix: check the "
                        "network (and HF_ENDPOINT, HF_HUB_OFFLINE), then push it with pipeline.stages=[release] "
                        "release=hub in the same run folder.") from None
    except HfHubHTTPError as err:
        raise UserError(f"The hub refused to create {release.repo_id} ({_http_reason(err)}); nothing was uploaded. "
                        "Fix: check that HF_TOKEN is valid and may write to that namespace, and the repo id "
                        "(<your-name>/<model-name>).") from None
    try:
        commit = api.upload_folder(repo_id=release.repo_id, folder_path=out_dir, commit_message=message,
                                   revision=release.revision)
    except unreachable as err:
        raise UserError(f"The upload to {release.repo_id} was interrupted ({type(err).__name__}: {err}). Fix: run "
                        "the release again (pipeline.stages=[release] release=hub in the same run folder); "
                        "files already on the hub are not uploaded twice.") from None
    log.info(f"release: pushed to {commit.commit_url}")
    return {**target, "url": str(url), "commit": commit.oid, "commit_url": commit.commit_url}


def _http_reason(err) -> str:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return f"HTTP {status}" if status else type(err).__name__
