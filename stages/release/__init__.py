"""Stage 4, release: the chosen model, ready to share, in `<run_dir>/release/<name>/`; `release=hub` pushes it.

The folder holds the annealed model (or the merged one, or the better of the two by an eval metric):
safetensors weights, config, generation config, tokenizer and chat template, the resolved
`mergekit_config.yml`, the DPO settings (`dpo_settings.yaml`) and a `README.md` model card written with
huggingface_hub's `ModelCard`: front matter (base models, tags, data sets, license, `model-index` from the
eval metrics) and a body with the lineage, the merged-versus-annealed table and the commands that reproduce
the run. Everything is read through the manifest and the eval report (`records.EvalReport`). Local paths
appear in public files only as folder names (hub downloads as their hub ids), and no token is ever written.

`run` reads as its phases: pick (which model, and why) -> card (lineage, metrics, reproducing commands;
stages/release/card.py) -> write (the folder, checked to load and to hold no token or local path) -> push
(stages/release/hub.py).
"""

import logging
import os
import shutil
from pathlib import Path

import yaml
from omegaconf import DictConfig

from pipeline import UserError, artifacts, manifest, records
from stages.release import card as cards
from stages.release import hub
from stages.release.card import DPO_NAME, LOWER_IS_BETTER, MERGE_CONFIG_NAME
from stages.release.settings import ReleaseSettings, hub_token, secrets

log = logging.getLogger(__name__)

# What a release takes from the chosen model folder: weights (safetensors only), config, generation config,
# tokenizer files and chat template(s). Nothing else (no optimizer state, no pickles, no stray files).
MODEL_FILES = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
TEMPLATE_DIR = "additional_chat_templates"
CARD_NAME = "README.md"
# What `release.pick=best` can compare: the eval report's scalar metrics, benchmarks/<task>, retention/worst, and
# `verdict` (the annealed model when the verdict says ship, else the merged one).
OBJECTIVES = records.SCALAR_METRICS
GROUPS = ("benchmarks", "retention")


def check(cfg: DictConfig) -> ReleaseSettings:
    """Every release setting, before the first stage runs: the pick, the objective, the folder name, and with
    release=hub the repository and the token."""
    release = ReleaseSettings.of(cfg.release, "release")
    group, _, key = release.objective.partition("/")
    known = group in OBJECTIVES or (group in GROUPS and key) or release.objective == "verdict"
    if release.pick == "best" and not known:
        raise UserError(
            f"release.objective={release.objective} is not an eval metric. Fix: use one of "
            f"{', '.join(OBJECTIVES)}, benchmarks/<task>, retention/worst, or verdict."
        )
    return release


def run(cfg: DictConfig, run_dir: Path) -> records.ReleaseRecord:
    """Write the release folder (and push it with release=hub); returns the stage's record."""
    release, run_dir = check(cfg), Path(run_dir).resolve()
    token = hub_token() if release.publish and not release.dry_run else None
    merge = records.load(run_dir, records.MergeRecord)
    anneal = records.load(run_dir, records.AnnealRecord)
    evaluation = records.load(run_dir, records.EvalRecord)
    report = records.read_report(evaluation.outputs.metrics)
    pick = choose(release, report)
    model_dir = Path(anneal.outputs.model if pick["picked"] == "annealed" else merge.outputs.model)
    check_weights(model_dir)
    name = release.name or f"{merge.merge_method}-{pick['picked']}"
    log.info(f"release: {pick['picked']} model ({pick['reason']})")
    names = cards.PublicNames(
        [*merge.inputs.sources, *([anneal.inputs.reference_source] if anneal.inputs.reference_source else [])]
    )
    lineage = cards.describe_lineage(merge, anneal, names)
    commands = cards.reproduce_commands(manifest.load(run_dir).get("commands", []), names)
    # one document per merge (a mergekit-multi chain: each intermediate, then the final merge)
    merge_docs = [names.public(doc) for doc in yaml.safe_load_all(Path(merge.outputs.config).read_text())]
    dpo_settings = names.public(
        {
            "anneal": anneal.config.anneal.model_dump(mode="json"),
            "reference": lineage["reference"],
            "data": {**anneal.data, "sources": anneal.inputs.data},
        }
    )
    card = cards.model_card(cards.CardContent(name, pick, lineage, report, merge_docs, dpo_settings, commands, release))
    private = secrets() + [
        str(run_dir),
        str(Path.home()),
        str(Path(cfg.pipeline.cache_dir).expanduser().resolve()),
        str(Path(cfg.models.cache_dir).expanduser().resolve()),
    ]
    out_dir, files = write(run_dir / "release" / name, model_dir, merge_docs, dpo_settings, card, private)
    pushed = None
    if release.publish:
        message = release.commit_message or (
            f"Release {name}: the {pick['picked']} model of a "
            f"{lineage['method']} merge of {', '.join(lineage['parents'])} "
            "(merge-anneal)"
        )
        pushed = hub.push(out_dir, files, release, message, token)
    return records.ReleaseRecord(
        inputs={
            "model": str(model_dir),
            "merged": merge.outputs.model,
            "annealed": anneal.outputs.model,
            "metrics": evaluation.outputs.metrics,
            "mergekit_config": merge.outputs.config,
        },
        outputs={"model": str(out_dir), "card": str(out_dir / CARD_NAME), "files": files},
        config={"release": release.model_dump(mode="json")},
        pick=pick,
        commands=commands,
        **({"hub": pushed} if pushed is not None else {}),
    )


def write(
    out_dir: Path, model_dir: Path, merge_docs: list[dict], dpo_settings: dict, card, private: list[str]
) -> tuple[Path, list[str]]:
    """The release folder, published whole once it loads and holds no token or local path; its files."""

    def fill(tmp: Path) -> None:
        copy_model(model_dir, tmp)
        (tmp / MERGE_CONFIG_NAME).write_text(
            "# The resolved mergekit configuration of this merge; local model folders are shown by name.\n"
            + yaml.safe_dump_all(merge_docs, sort_keys=False)
        )
        (tmp / DPO_NAME).write_text(
            "# The anneal stage's DPO settings (TRL DPOConfig field names under trainer).\n"
            + yaml.safe_dump(dpo_settings, sort_keys=False)
        )
        card.save(tmp / CARD_NAME)
        check_loads(tmp)
        check_public(tmp, private)

    artifacts.publish(out_dir, fill)
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    log.info(f"release: {out_dir} ({len(files)} files)")
    return out_dir, files


# ------------------------------------------------------------------------------------------------- checks


def check_weights(model_dir: Path) -> None:
    """The chosen folder must hold safetensors weights and no pickled ones."""
    pickled = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickled or not any(model_dir.glob("*.safetensors")):
        found = f"pickled weights ({', '.join(pickled)})" if pickled else "no *.safetensors weights"
        raise UserError(
            f"The model to release, {model_dir}, holds {found}; merge-anneal releases safetensors only. "
            "Fix: re-run the stage that wrote it (it saves safetensors), or convert the weights "
            "(load with transformers and save_pretrained) and remove the .bin files."
        )


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


def choose(release: ReleaseSettings, report: records.EvalReport) -> dict:
    """Which model to release, and why."""
    if release.pick != "best":
        return {"choice": release.pick, "picked": release.pick, "reason": f"release.pick={release.pick}"}
    objective = release.objective
    if objective == "verdict":
        picked = "annealed" if report.verdict["ship"] else "merged"
        return {"choice": "best", "picked": picked, "objective": objective, "reason": report.verdict["sentence"]}
    merged, annealed = (report.models[m].value(objective) for m in ("merged", "annealed"))
    if not all(isinstance(v, (int, float)) for v in (merged, annealed)):
        raise UserError(
            f"release.objective={objective} is not an eval metric of both the merged and the annealed "
            f"model. Fix: use one of {', '.join(report.models['annealed'].scalars())}."
        )
    lower = objective.split("/")[0] in LOWER_IS_BETTER
    better_merged = merged < annealed if lower else merged > annealed
    picked = "merged" if better_merged else "annealed"
    comparison = report.delta(objective)
    reason = (
        f"best by {objective}, {'lower' if lower else 'higher'} is better: annealed {annealed:.4g}, merged "
        f"{merged:.4g}" + ("; equal, so the annealed model (the default)" if merged == annealed else "")
    )
    if comparison:
        lo, hi = comparison["ci95"]
        reason += (
            f"; annealed - merged {comparison['delta']:+.4g}, 95% paired-bootstrap interval "
            f"[{lo:+.4g}, {hi:+.4g}]" + (", which contains 0" if lo <= 0 <= hi else "")
        )
    return {
        "choice": "best",
        "picked": picked,
        "objective": objective,
        "higher_is_better": not lower,
        "values": {"merged": merged, "annealed": annealed},
        "reason": reason,
    }


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
