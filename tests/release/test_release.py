"""The release stage: a real run on the tiny random parents (short anneal), the released folder and its model
card, pick=best, and the publishing paths (dry run, no token, no network), all without reaching the hub; the
README's demo run's card (slow tier)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import UserError, manifest

# A short anneal (as in test_anneal.py).
SHORT = ["anneal.trainer.max_steps=4", "anneal.trainer.logging_steps=2", "anneal.trainer.save_steps=1000"]
SENTINEL = "hf_releaseTestSentinel0123456789abcdef"  # a fake token: must never reach a released file
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # fails at once, deterministically, whatever the network
# One torch thread: on a shared 2-core machine two spinning threads per process made eval 20x slower (measured
# 110 s vs 6 s); this file tests what the release writes, not speed.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NO_TOKEN = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""}
HUB = ["pipeline.stages=[release]", "release=hub", "release.repo_id=someone/demo-merge"]


REMOTE_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class Config(LlamaConfig): pass
class Model(LlamaForCausalLM): pass
class Tokenizer(PreTrainedTokenizerFast): pass
"""


def with_remote_code(tiny, root: Path) -> list[str]:
    """Copies of the tiny parents whose config and tokenizer config point at custom code (`auto_map`), as hub repos
    with remote code do; the code writes `root/remote-code-ran` if anything imports it."""
    from filelock import FileLock

    with FileLock(str(root / "remote-code.lock")):
        for name in ("base", "add", "reverse"):
            folder = root / "remote-code" / name
            if folder.is_dir():
                continue
            shutil.copytree(tiny[name], folder)
            (folder / "custom.py").write_text(REMOTE_CODE.format(marker=str(root / "remote-code-ran")))
            for file, auto_map in (
                ("config.json", {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}),
                ("tokenizer_config.json", {"AutoTokenizer": [None, "custom.Tokenizer"]}),
            ):
                settings = json.loads((folder / file).read_text())
                (folder / file).write_text(json.dumps({**settings, "auto_map": auto_map}))
    parents = root / "remote-code"
    return [
        "models=local",
        f"models.base={parents / 'base'}",
        f"models.parents=[{parents / 'add'},{parents / 'reverse'}]",
    ]


@pytest.fixture(scope="module")
def release_run(tmp_path_factory, tiny):
    """`python -m pipeline +merge=slerp` (short anneal) with a token in the environment, on tiny parents that
    carry remote code (`auto_map`): all four stages, run once for the session."""
    from conftest import run_once, session_root

    models = with_remote_code(tiny, session_root(tmp_path_factory))
    work, _ = run_once(
        tmp_path_factory,
        "release-run",
        "+merge=slerp",
        *SHORT,
        *models,
        *tiny.data,
        env={"HF_TOKEN": SENTINEL, **UNREACHABLE, **ONE_THREAD},
    )
    return work / "run", work


@pytest.fixture
def run_copy(release_run, tmp_path):
    """A copy of the finished run folder, for runs that change its manifest."""
    run_dir, _ = release_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("release"))
    return copy


def release_again(run_dir: Path, *overrides: str, env: dict | None = None):
    """`python -m pipeline pipeline.stages=[release] ...` on an existing run folder."""
    from conftest import TEST_CACHE, run_cli

    stages = [] if any(o.startswith("pipeline.stages=") for o in overrides) else ["pipeline.stages=[release]"]
    return run_cli(
        *stages,
        *overrides,
        f"pipeline.cache_dir={run_dir.parent / 'cache'}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
        env={**UNREACHABLE, **ONE_THREAD, **(env or {})},
    )


def one_paragraph_error(result, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip()
    assert message.startswith("merge-anneal: error:") and "Traceback" not in message and "\n\n" not in message, message
    for phrase in phrases:
        assert phrase in " ".join(message.split()), message


def released_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ the default run


def test_release_folder_holds_the_annealed_model_and_loads(release_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir, _ = release_run
    stages = manifest.load(run_dir)["stages"]
    entry = stages["release"]
    assert entry["status"] == "done" and entry["pick"]["picked"] == "annealed"
    folder = Path(entry["outputs"]["model"])
    assert folder == run_dir.resolve() / "release" / "slerp-annealed"
    assert released_files(folder) == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "mergekit_config.yml",
        "dpo_settings.yaml",
        "README.md",
    }
    assert sorted(entry["outputs"]["files"]) == sorted(released_files(folder))
    assert [p.name for p in (run_dir / "release").iterdir()] == ["slerp-annealed"]  # no partial folder left
    annealed = Path(stages["anneal"]["outputs"]["model"])
    assert (folder / "model.safetensors").read_bytes() == (annealed / "model.safetensors").read_bytes()

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and GenerationConfig.from_pretrained(folder).eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()

    merge_config = yaml.safe_load((folder / "mergekit_config.yml").read_text())
    assert merge_config["merge_method"] == "slerp" and merge_config["base_model"] == "add"
    assert [m["model"] for m in merge_config["models"]] == ["add", "reverse"]
    dpo = yaml.safe_load((folder / "dpo_settings.yaml").read_text())
    assert dpo["anneal"]["trainer"]["max_steps"] == 4 and dpo["reference"]["model"] == "add"
    assert dpo["data"]["train_pairs"] == 48


def test_model_card_front_matter_numbers_and_command(release_run, tiny):
    from huggingface_hub import ModelCard

    from conftest import TEST_CACHE

    run_dir, work = release_run
    stages = manifest.load(run_dir)["stages"]
    folder = Path(stages["release"]["outputs"]["model"])
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.base_model == ["add", "reverse"]  # local parents: their names
    assert {"merge", "mergekit", "dpo", "trl", "slerp"} <= set(data.tags)
    assert data.datasets == ["train.jsonl", "heldout.jsonl"] and data.license == "unknown"  # local files: names
    assert data.library_name == "transformers" and data.model_name == "slerp-annealed"

    metrics = json.loads(Path(stages["eval"]["outputs"]["metrics"]).read_text())["models"]["annealed"]
    expected = [("held-out preference pairs", k, v) for k, v in metrics.items() if isinstance(v, float)]
    expected += [(task, "exact_match", v) for task, v in metrics["benchmarks"].items()]  # the demo's lm-eval tasks
    assert [(r.task_name, r.metric_type, r.metric_value) for r in data.eval_results] == expected
    assert {task for task, _, _ in expected} >= {"demo_add", "demo_reverse"}

    text = card.text
    verdict = json.loads(Path(stages["eval"]["outputs"]["metrics"]).read_text())["verdict"]
    assert f"**Verdict.** {verdict['sentence']}" in text
    assert "python -m pipeline +merge=slerp " + " ".join(SHORT) + " models=local 'models.base=<local>/base'" in text
    assert "pipeline.cache_dir" not in text  # the cache overrides are left out
    assert "## Lineage" in text and "`add` (local)" in text and "t=0.5" in text and "beta 0.1" in text
    assert "| preference_accuracy | " in text and "annealed - merged" in text
    readme = (folder / "README.md").read_text()
    for private in (
        str(run_dir),
        str(run_dir.resolve()),
        str(work),
        str(TEST_CACHE),
        str(tiny.root),
        "/work",
        str(Path.home()),
    ):
        assert private not in readme, private
    for file in folder.rglob("*"):  # the token in the environment is in no released file
        assert SENTINEL.encode() not in file.read_bytes(), file


def test_the_token_in_the_environment_is_written_nowhere(release_run):
    """A whole pipeline run with HF_TOKEN set: not in the run folder (manifest, configs, logs, models, release),
    not in the result cache it filled, not on the console."""
    run_dir, work = release_run
    files = [f for root in (run_dir, work / "cache") for f in root.rglob("*") if f.is_file()]
    assert len(files) > 20 and (run_dir / "merge-anneal.log").is_file()
    for file in files:
        assert SENTINEL.encode() not in file.read_bytes(), file
    console = json.loads((work.parent / f"{work.name}.json").read_text())
    assert SENTINEL not in console["stdout"] + console["stderr"]


def test_remote_code_never_runs(release_run, tmp_path_factory):
    """trust_remote_code stays off in every load (mergekit, tokenizers, training, eval, release): parents whose
    config and tokenizer point at custom code are loaded with transformers' own Llama classes, and the code, which
    would leave a file behind, never runs."""
    from conftest import session_root

    run_dir, _ = release_run
    assert manifest.load(run_dir)["stages"]["release"]["status"] == "done"
    assert (session_root(tmp_path_factory) / "remote-code" / "add" / "custom.py").is_file()
    assert not (session_root(tmp_path_factory) / "remote-code-ran").exists()


def test_pick_best_picks_the_better_by_the_objective_and_says_why(run_copy, make_cfg):
    from stages import release

    run_dir = run_copy
    metrics = json.loads(Path(manifest.load(run_dir)["stages"]["eval"]["outputs"]["metrics"]).read_text())["models"]
    for objective, higher_is_better in (("preference_accuracy", True), ("perplexity", False)):
        merged, annealed = metrics["merged"][objective], metrics["annealed"][objective]
        better_merged = merged > annealed if higher_is_better else merged < annealed
        entry = release.run(
            make_cfg("release.pick=best", f"release.objective={objective}", f"release.name=best-{objective}"), run_dir
        ).model_dump()
        pick = entry["pick"]
        assert pick["picked"] == ("merged" if better_merged else "annealed"), pick
        assert pick["values"] == {"merged": merged, "annealed": annealed}
        assert objective in pick["reason"] and ("lower is better" in pick["reason"]) != higher_is_better
        card = (Path(entry["outputs"]["model"]) / "README.md").read_text()
        assert pick["reason"] in card
    with pytest.raises(UserError, match="release.objective=bleu is not an eval metric"):
        release.run(make_cfg("release.pick=best", "release.objective=bleu"), run_dir)


# ---------------------------------------------------------------------------------------------- publishing


def test_hub_dry_run_lists_files_and_uploads_nothing(run_copy):
    result = release_again(run_copy, *HUB, "release.dry_run=true", "release.name=dry", env=NO_TOKEN)
    assert result.returncode == 0, result.stderr[-3000:]
    entry = manifest.load(run_copy)["stages"]["release"]
    assert entry["status"] == "done" and entry["hub"]["dry_run"] is True
    assert entry["hub"]["repo_id"] == "someone/demo-merge" and entry["hub"]["private"] is True
    for name in ("README.md", "model.safetensors", "mergekit_config.yml", "dpo_settings.yaml"):
        assert f"  {name}  (" in result.stdout, result.stdout
    assert entry["hub"]["commit_message"] in result.stdout and "nothing uploaded" in result.stdout
    # two invocations made this release: the full run, then the release-only one
    card = (run_copy / "release" / "dry" / "README.md").read_text()
    assert "run in order in one run folder" in card and "release=hub" in card


def test_hub_without_token_is_refused_before_any_stage_runs(run_copy):
    before = manifest.load(run_copy)
    result = release_again(run_copy, *HUB, "release.name=pushed", env=NO_TOKEN)
    one_paragraph_error(result, "HF_TOKEN is not set", "nothing was written or uploaded", "release.dry_run=true")
    assert manifest.load(run_copy) == before  # refused before the release stage started: nothing recorded
    assert not (run_copy / "release").exists()


def test_hub_with_token_but_no_network_fails_before_uploading(run_copy):
    result = release_again(run_copy, *HUB, "release.name=pushed", env={"HF_TOKEN": SENTINEL})
    one_paragraph_error(result, "Could not reach the Hugging Face hub at http://127.0.0.1:9", "nothing was uploaded")
    assert SENTINEL not in result.stderr + result.stdout
    assert manifest.load(run_copy)["stages"]["release"]["status"] == "failed"


@pytest.mark.parametrize(
    "overrides, phrases",
    [
        (["release.pick=worst"], ["release.pick: Input should be 'annealed', 'merged' or 'best' (got 'worst')"]),
        (["release=hub"], ["release.repo_id is not set", "release.repo_id=<your-name>/<model-name>"]),
        (["release=hub", "release.repo_id=me/merge"], ["HF_TOKEN is not set", "release.dry_run=true"]),
        (["release.name=../up"], ["release.name=../up is not a usable folder name"]),
        (["release.pick=best", "release.objective=bleu"], ["release.objective=bleu is not an eval metric"]),
        (["+release.pushh=true"], ["release.pushh: Extra inputs are not permitted"]),
    ],
    ids=["pick", "repo_id", "token", "name", "objective", "unknown-key"],
)
def test_check_refuses_bad_release_settings(overrides, phrases, make_cfg, monkeypatch):
    """`release.check` (what the app runs before the first stage) refuses each in one paragraph with the fix."""
    from stages import release

    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(UserError) as refused:
        release.check(make_cfg(*overrides))
    message = " ".join(str(refused.value).split())
    assert all(phrase in message for phrase in phrases) and "Fix:" in message, message


# ------------------------------------------------------------------------------------------------ the files


def test_generation_config_written_when_missing_and_pickles_refused(tiny, tmp_path):
    from transformers import AutoConfig, GenerationConfig

    from stages import release

    source = tmp_path / "model"
    shutil.copytree(tiny["add"], source, ignore=shutil.ignore_patterns("generation_config.json"))
    release.copy_model(source, tmp_path / "out")
    written = GenerationConfig.from_pretrained(tmp_path / "out")
    assert written.eos_token_id == AutoConfig.from_pretrained(source).eos_token_id
    (source / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pickled weights"):
        release.check_weights(source)
    for file in source.glob("*.*"):
        if file.suffix in (".bin", ".safetensors"):
            file.unlink()
    with pytest.raises(UserError, match="no \\*.safetensors"):
        release.check_weights(source)


def test_reproduce_commands_hide_local_paths_and_span_invocations():
    from pipeline.records import ModelSource
    from stages.release import card

    snapshot = "/home/me/.cache/huggingface/hub/models--org--base/snapshots/abc"
    names = card.PublicNames(
        [ModelSource(path=snapshot, hub_id="org/base", revision="abc"), ModelSource(path="/ckpt/math")]
    )
    full = {
        "overrides": [
            "+merge=ties",
            "models=local",
            "models.parents=[/ckpt/math,org/code@v1]",
            f"models.base={snapshot}",
            "pipeline.cache_dir=/tmp/c",
            "models.cache_dir=/tmp/m",
        ],
        "stages": ["merge", "anneal", "eval", "release"],
    }
    assert card.reproduce_commands([full], names) == [  # a hub download by its hub id and commit
        "python -m pipeline +merge=ties models=local 'models.parents=[<local>/math,org/code@v1]' "
        "models.base=org/base@abc"
    ]
    again = {"overrides": ["pipeline.stages=[release]", "release.pick=best"], "stages": ["release"]}
    assert (
        card.reproduce_commands([full, again], names)[1]
        == "python -m pipeline 'pipeline.stages=[release]' release.pick=best 'hydra.run.dir=<run>'"
    )
    assert card.reproduce_commands([again], names) == []  # the rest was driven from Python: nothing to show
    # a snapshot path that did not come through the hub download is just a local folder
    assert card.reproduce_commands([full], card.PublicNames([]))[0].endswith("'models.base=<local>/abc'")


def test_public_names_come_from_provenance_not_paths():
    """Hub downloads are named by the id and commit recorded when they were resolved; nothing is parsed out of a
    cache path."""
    from pipeline.records import ModelSource
    from stages.release import card

    names = card.PublicNames(
        [
            ModelSource(path="/cache/snapshots/0123abc", hub_id="org/model", revision="0123abc"),
            ModelSource(path="/ckpt/my-model"),
        ]
    )
    assert names.name("/cache/snapshots/0123abc") == "org/model"
    assert names.name("/cache/snapshots/0123abc", revision=True) == "org/model@0123abc"
    assert names.name("/ckpt/my-model") == "my-model" and not names.is_hub("/ckpt/my-model")
    assert names.is_hub("/cache/snapshots/0123abc") and names.is_hub("org/other")
    assert names.name("/x/models--org--name/snapshots/abc") == "abc"  # not reverse-engineered
    assert names.public(
        {"base_model": "/cache/snapshots/0123abc", "models": [{"model": "/ckpt/my-model"}], "t": 0.5}
    ) == {"base_model": "org/model@0123abc", "models": [{"model": "my-model"}], "t": 0.5}


@pytest.mark.slow
def test_the_readme_runs_release_names_the_demo(readme_run):
    """The README's own run releases the annealed demo merge: its card names the demo's parents and data set."""
    from huggingface_hub import ModelCard

    run_dir = readme_run[0]
    entry = manifest.load(run_dir)["stages"]["release"]
    assert entry["status"] == "done" and entry["pick"]["picked"] == "annealed"
    data = ModelCard.load(Path(entry["outputs"]["card"])).data
    assert data.base_model == ["add", "reverse"]  # the demo's parents are local: their names
    assert data.datasets == ["merge-anneal-demo"]
    dpo = yaml.safe_load((Path(entry["outputs"]["model"]) / "dpo_settings.yaml").read_text())
    assert dpo["data"]["train_pairs"] == 4000 and dpo["reference"]["model"] == "add"
