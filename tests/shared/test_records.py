"""Typed stage records (pipeline/records.py) and provenance: what one stage reads of another is validated, and a
hub model keeps its id and downloaded commit from the moment it is resolved to the manifest and the card."""

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import ONE_THREAD, TEST_CACHE, run_cli
from pipeline import UserError, manifest, records

MERGE_ENTRY = {
    "status": "done",
    "inputs": {
        "models": ["/m/a", "/m/b"],
        "parents": ["/m/a", "/m/b"],
        "base_model": "/m/a",
        "sources": [{"path": "/m/a", "hub_id": "org/a", "revision": "abc"}],
    },
    "outputs": {"model": "/run/merge/model", "config": "/run/merge/model/mergekit_config.yml"},
    "config": {"merge": {"merge_method": "slerp", "parameters": {"t": 0.5}}, "merge_options": {}, "models": {}},
    "merge_method": "slerp",
    "cache": {"merge": "miss"},
    "seconds": 1.0,
    "versions": {"mergekit": "0.1.5"},
}


def test_records_read_what_the_manifest_holds(tmp_path):
    manifest.save(tmp_path, {"stages": {"merge": MERGE_ENTRY}})
    merge = records.load(tmp_path, records.MergeRecord)
    assert merge.merge_method == "slerp" and merge.parameters == {"t": 0.5}
    assert merge.source("/m/a").public_name() == "org/a@abc" and merge.source("/m/b").public_name() == "b"
    assert merge.dump()["outputs"] == MERGE_ENTRY["outputs"]  # the manifest keeps its shape
    with pytest.raises(UserError, match="Stage 'anneal' has no completed output"):
        records.load(tmp_path, records.AnnealRecord)


def test_a_renamed_field_fails_where_it_is_read(tmp_path):
    broken = {**MERGE_ENTRY, "outputs": {"merged_model": "/run/merge/model", "config": "/x"}}
    manifest.save(tmp_path, {"stages": {"merge": broken}})
    with pytest.raises(ValidationError, match="outputs.model"):
        records.load(tmp_path, records.MergeRecord)


def fake_hub_snapshot(hub_cache: Path, repo_id: str, source: Path, commit: str) -> None:
    """A model as huggingface_hub's cache holds a download: models--org--name/snapshots/<commit>/, refs/main."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_models_keep_their_id_and_commit_to_the_manifest_and_the_card(tmp_path, tiny):
    """Hub ids resolved from huggingface_hub's cache (offline): the merge records `{path, hub_id, revision}` for
    each parent, and the release names them `org/name@commit`."""
    hub_cache = tmp_path / "hub"
    commits = {"org/add": "a" * 40, "org/reverse": "b" * 40}
    for repo_id, commit in commits.items():
        fake_hub_snapshot(hub_cache, repo_id, tiny[repo_id.split("/")[1]], commit)
    run_dir = tmp_path / "run"
    result = run_cli(
        "+merge=slerp",
        "models=local",
        "models.parents=[org/add,org/reverse]",
        *tiny.data,
        "anneal.trainer.max_steps=2",
        "anneal.trainer.save_strategy=no",
        "eval.samples=1",
        f"pipeline.cache_dir={tmp_path / 'cache'}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), **ONE_THREAD},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stages = manifest.load(run_dir)["stages"]
    sources = {s["hub_id"]: s for s in stages["merge"]["inputs"]["sources"]}
    for repo_id, commit in commits.items():
        assert sources[repo_id]["revision"] == commit
        assert Path(sources[repo_id]["path"]).is_relative_to(hub_cache)
    assert stages["anneal"]["inputs"]["reference_source"] == sources["org/add"]  # slerp's base model
    card = (Path(stages["release"]["outputs"]["model"]) / "README.md").read_text()
    assert f"org/add@{commits['org/add']}" in card and "https://huggingface.co/org/reverse" in card
    config = (Path(stages["release"]["outputs"]["model"]) / "mergekit_config.yml").read_text()
    assert f"org/reverse@{commits['org/reverse']}" in config and str(hub_cache) not in config
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["release"]["status"] == "done"
