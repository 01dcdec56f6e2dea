"""The files in examples/ run with the commands examples/README.md gives (fast tier, the tiny random parents): each
mergekit YAML verbatim, in a folder whose ./checkpoints/{base,math,code} are the tiny base and its two children,
annealed on one of the two example pair files (standard and conversational), evaluated and released, with every
example pair kept."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHORT, TEST_CACHE, run_in_process
from pipeline import manifest
from pipeline.preferences import prompt_key

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Settings of the tests, not of the examples: the tiny models' length limit and batch, no benchmarks (their data sets
# come from the hub), short generations.
TEST_ONLY = [
    *SHORT,
    "anneal.trainer.per_device_train_batch_size=2",
    "anneal.trainer.max_length=64",
    "eval/benchmarks=none",
    "eval.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny) -> Path:
    """A user's folder: a copy of examples/ and ./checkpoints/{base,math,code}, the placeholders the examples name."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(EXAMPLES, root / "examples")
    for placeholder, name in (("base", "base"), ("math", "add"), ("code", "reverse")):
        shutil.copytree(tiny[name], root / "checkpoints" / placeholder)
    return root


def run_example(workspace: Path, config: str, pairs: str, run_dir: Path, cache: Path, *overrides: str):
    """The command examples/README.md gives for `config` and `pairs`, run in `workspace` with the tests' settings."""
    return run_in_process(
        "+merge=custom",
        f"merge.config_file=examples/{config}",
        "data=custom",
        f"data.path=examples/{pairs}",
        f"pipeline.cache_dir={cache}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.run.dir={run_dir}",
        *overrides,
        cwd=workspace,
    )


def test_the_readme_names_every_example_and_its_command():
    readme = (EXAMPLES / "README.md").read_text()
    files = sorted(p.name for p in EXAMPLES.iterdir() if p.name != "README.md")
    assert files == ["chain.yml", "merge.yml", "moe.yml", "prefs.jsonl", "prefs_conversational.jsonl"]
    for name in files:
        assert f"examples/{name}" in readme
    for config in ("merge.yml", "chain.yml", "moe.yml"):
        assert f"+merge=custom merge.config_file=examples/{config} data=custom data.path=examples/prefs" in readme


@pytest.mark.parametrize(
    "config, pairs",
    [("merge.yml", "prefs.jsonl"), ("chain.yml", "prefs_conversational.jsonl"), ("moe.yml", "prefs.jsonl")],
)
def test_each_example_merges_anneals_evaluates_and_releases(config, pairs, workspace, shared_cache, tmp_path):
    run_dir = tmp_path / "run"
    result = run_example(workspace, config, pairs, run_dir, shared_cache, *TEST_ONLY)
    assert result.returncode == 0, result.stderr[-4000:]
    stages = manifest.load(run_dir)["stages"]
    assert {s: stages[s]["status"] for s in stages} == dict.fromkeys(("merge", "anneal", "eval", "release"), "done")

    # the YAML's own models, as written: the placeholders resolved from the folder the command ran in
    merge = stages["merge"]
    assert sorted(Path(p).name for p in merge["inputs"]["models"]) == ["base", "code", "math"]
    merged_dir = Path(merge["outputs"]["model"])
    if config == "merge.yml":
        assert merge["merge_method"] == "ties"
    if config == "chain.yml":
        assert [(s["name"], s["merge_method"]) for s in merge["chain"]] == [("math-code", "slerp"), (None, "ties")]
        assert (run_dir / "merge" / "intermediates" / "math-code" / "config.json").is_file()
    if config == "moe.yml":
        settings = json.loads((merged_dir / "config.json").read_text())
        assert settings["architectures"] == ["MixtralForCausalLM"] and settings["num_local_experts"] == 2

    # every example pair trained on or held out, as written (nothing dropped, conversations kept as messages)
    data = stages["anneal"]["data"]
    assert all(count == 0 for split in data["dropped"].values() for count in split.values()), data["dropped"]
    assert data["train_pairs"] + data["heldout_pairs"] == 3
    import pyarrow.parquet as pq

    stored = pq.read_table(stages["anneal"]["outputs"]["reference_logps"]).to_pylist()
    written = [json.loads(line) for line in (EXAMPLES / pairs).read_text().splitlines()]
    as_text = lambda row: tuple(prompt_key(row[c]) for c in ("prompt", "chosen", "rejected"))
    assert sorted(map(as_text, stored)) == sorted(map(as_text, written))
    assert Path(stages["release"]["outputs"]["model"], "mergekit_config.yml").is_file()


def test_an_unedited_example_names_the_placeholder_to_replace(tmp_path):
    """Run where no ./checkpoints/ exists, the example stops at once naming its placeholder; the refusal for a
    missing merge file names an example that exists."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    result = run_example(tmp_path, "merge.yml", "prefs.jsonl", tmp_path / "run", tmp_path / "cache", *TEST_ONLY)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Model folder not found: ./checkpoints/" in message, message
    assert "Traceback" not in message

    result = run_example(tmp_path, "missing.yml", "prefs.jsonl", tmp_path / "run2", tmp_path / "cache", *TEST_ONLY)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "merge.config_file=examples/merge.yml" in message, message
