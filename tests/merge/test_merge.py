"""The merge stage: every mergekit method on the tiny random parents (fast tier), custom YAML, cache, determinism,
bad input."""

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline import UserError, manifest, merge_config, models
from pipeline.app import merge_options, run_pipeline
from pipeline.demo import demo_dir
from stages import merge
from stages.merge.config import localize

ALL_METHODS = sorted(p for p in merge_options() if p not in ("custom", "moe"))  # moe: mergekit-moe
MERGE_ONLY = "pipeline.stages=[merge]"


@pytest.fixture
def make_cfg(make_cfg, tiny):
    """These tests exercise the merge stage alone, on the tiny parents (overrides may choose others)."""
    return lambda *overrides: make_cfg(MERGE_ONLY, *([] if "models=local" in overrides else tiny.models), *overrides)


def mergekit_methods() -> list[str]:
    from mergekit.merge_methods import registry

    return sorted(m.spec.name for m in registry.registered_methods())


def test_one_merge_option_per_mergekit_method():
    assert ALL_METHODS == mergekit_methods()
    assert len(ALL_METHODS) == 20


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_option_composes_and_validates(method, make_cfg, tiny):
    cfg = make_cfg(f"+merge={method}")
    config = merge.validate(localize(merge_config.load(cfg)[0])[0])
    assert config.merge_method == method
    referenced = {Path(m.model.path) for m in config.referenced_models()}
    assert referenced <= {tiny["base"], tiny["add"], tiny["reverse"]}
    assert merge.build_options(cfg.merge_options).write_model_card is False


def test_model_stock_uses_base_and_both_children(make_cfg, tiny):
    config = merge.validate(merge_config.load(make_cfg("+merge=model_stock"))[0])
    assert {Path(m.model.path).name for m in config.referenced_models()} == {"base", "add", "reverse"}


def test_override_speaks_mergekit(make_cfg, tiny):
    cfg = make_cfg("+merge=slerp", "merge.parameters.t=0.3")
    assert merge.validate(merge_config.load(cfg)[0]).parameters["t"] == 0.3


def load_merged(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_merges_the_tiny_parents_as_mergekit_does(method, make_cfg, tmp_path, tiny):
    """The stage's merge holds the tensors mergekit's own `run_merge` writes from the stage's resolved config and
    options, and is whole, finite, with the donor's tokenizer; the parents are left untouched."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    before = {name: models.fingerprint(tiny[name]) for name in ("base", "add", "reverse")}
    run_dir = tmp_path / "run"
    result = run_pipeline(make_cfg(f"+merge={method}"), run_dir)

    entry = result["stages"]["merge"]
    assert entry["status"] == "done"
    model_dir = Path(entry["outputs"]["model"])
    assert model_dir == run_dir.resolve() / "merge" / "model"
    assert all(Path(p).is_absolute() for p in entry["inputs"]["models"])
    assert set(entry["inputs"]["models"]) <= {str(tiny[n]) for n in before}
    assert entry["config"]["merge"]["merge_method"] == method
    assert entry["versions"]["mergekit"] and entry["seconds"] >= 0

    model, tokenizer = load_merged(model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    donor = AutoTokenizer.from_pretrained(tiny["add"])
    assert tokenizer.get_vocab() == donor.get_vocab()
    assert tokenizer.chat_template and tokenizer.chat_template == donor.chat_template
    written = yaml.safe_load((model_dir / "mergekit_config.yml").read_text())
    assert written["merge_method"] == method and "modules" not in written  # as configured, not mergekit's internals
    assert not list(model_dir.glob("*.bin"))
    # the same tensors as mergekit's own run_merge on the stage's resolved config and options
    options = MergeOptions(**{k: v for k, v in entry["config"]["merge_options"].items() if v is not None})
    run_merge(MergeConfiguration.model_validate(written), str(tmp_path / "mergekit"), options=options)
    ours, theirs = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "mergekit" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the parents are never modified
    assert before == {name: models.fingerprint(tiny[name]) for name in before}


def test_slerp_interpolates_between_the_parents(make_cfg, tmp_path, tiny):
    """t=0 gives the base_model endpoint, t=0.5 something strictly between: the parameter reaches mergekit."""

    def merged(t):
        run = run_pipeline(make_cfg("+merge=slerp", f"merge.parameters.t={t}"), tmp_path / f"t{t}")
        return load_file(Path(run["stages"]["merge"]["outputs"]["model"]) / "model.safetensors")

    parent = load_file(tiny["add"] / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(merged(0.0)[name], parent[name])
    assert not torch.equal(merged(0.5)[name], parent[name])


def weight_files(model_dir: Path) -> dict:
    return {
        p.name: p.read_bytes()
        for p in sorted(model_dir.iterdir())
        if p.suffix in (".safetensors", ".json", ".jinja", ".yml")
    }


def test_cache_hit_reuses_the_identical_merge(make_cfg, tmp_path, tiny):
    first = run_pipeline(make_cfg("+merge=ties"), tmp_path / "a")["stages"]["merge"]
    second = run_pipeline(make_cfg("+merge=ties"), tmp_path / "b")["stages"]["merge"]
    changed = run_pipeline(make_cfg("+merge=ties", "+merge.parameters.lambda=0.8"), tmp_path / "c")["stages"]["merge"]
    uncached = run_pipeline(make_cfg("+merge=ties", "pipeline.cache=false"), tmp_path / "d")["stages"]["merge"]
    assert (first["cache"]["merge"], second["cache"]["merge"]) == ("miss", "hit")
    assert changed["cache"]["merge"] == "miss"
    assert uncached["cache"]["merge"] == "off"
    out = {k: Path(e["outputs"]["model"]) for k, e in zip("abd", (first, second, uncached))}
    assert weight_files(out["a"]) == weight_files(out["b"]) == weight_files(out["d"])
    assert weight_files(out["a"]) != weight_files(Path(changed["outputs"]["model"]))


def test_cache_key_follows_parent_contents(make_cfg, tmp_path, tiny):
    """Same config over changed parent files is a different merge."""
    parents = tmp_path / "parents"
    for name in ("base", "add", "reverse"):
        shutil.copytree(tiny[name], parents / name)
    local = [
        "models=local",
        f"models.base={parents / 'base'}",
        f"models.parents=[{parents / 'add'},{parents / 'reverse'}]",
        "+merge=task_arithmetic",
    ]
    assert run_pipeline(make_cfg(*local), tmp_path / "a")["stages"]["merge"]["cache"]["merge"] == "miss"
    assert run_pipeline(make_cfg(*local), tmp_path / "b")["stages"]["merge"]["cache"]["merge"] == "hit"
    cfg_path = parents / "add" / "generation_config.json"
    cfg_path.write_text(cfg_path.read_text().replace("{", '{\n  "temperature": 0.5,', 1))
    assert run_pipeline(make_cfg(*local), tmp_path / "c")["stages"]["merge"]["cache"]["merge"] == "miss"


def test_local_folders_as_parents(make_cfg, tmp_path, tiny):
    """models=local takes user folders (relative paths too) exactly like the demo."""
    user = tmp_path / "checkpoints"
    for name in ("base", "add", "reverse"):
        shutil.copytree(tiny[name], user / f"my-{name}")
    cfg = make_cfg(
        "models=local",
        f"models.base={user / 'my-base'}",
        f"models.parents=[{user / 'my-add'},{user / 'my-reverse'}]",
        "+merge=model_stock",
    )
    entry = run_pipeline(cfg, tmp_path / "run")["stages"]["merge"]
    assert sorted(Path(p).name for p in entry["inputs"]["models"]) == ["my-add", "my-base", "my-reverse"]
    assert entry["inputs"]["base_model"] == str(user / "my-base")
    load_merged(Path(entry["outputs"]["model"]))


def test_custom_mergekit_yaml_runs_verbatim(cli, tmp_path, tiny):
    config_path = write_task_arithmetic_yaml(tmp_path / "my-merge.yml", tiny)
    result, run_dir = cli(
        "+merge=custom", f"merge.config_file={config_path}", MERGE_ONLY, *tiny.models, *tiny.data, process=True
    )  # a real `python -m pipeline`
    assert result.returncode == 0, result.stderr
    entry = manifest.load(run_dir)["stages"]["merge"]
    assert entry["status"] == "done"
    assert entry["inputs"]["config_file"] == str(config_path)
    assert [m["parameters"]["weight"] for m in entry["config"]["merge"]["models"]] == [0.7, 0.3]
    load_merged(Path(entry["outputs"]["model"]))
    # the same merge again, a new process: a cache hit found from its inputs alone, without importing mergekit
    # (~5 s: it imports peft, transformers and torch), with the first run's record; a merge alone never imports
    # datasets (its logs are routed only when a stage that reads data runs)
    again, run2 = cli(
        "+merge=custom",
        f"merge.config_file={config_path}",
        MERGE_ONLY,
        *tiny.models,
        *tiny.data,
        run_dir=tmp_path / "run2",
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert again.returncode == 0, again.stderr[-3000:]
    hit = manifest.load(run2)["stages"]["merge"]
    assert hit["cache"] == entry["cache"] | {"merge": "hit"} and entry["cache"]["merge"] == "miss"
    assert (hit["inputs"], hit["config"]) == (entry["inputs"], entry["config"])
    imported = [line.split("|")[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")]
    assert "pipeline.app" in imported and not [m for m in imported if m.startswith(("mergekit", "peft", "datasets"))]
    assert weight_files(run2 / "merge" / "model") == weight_files(run_dir / "merge" / "model")


def write_task_arithmetic_yaml(path: Path, tiny) -> Path:
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {tiny['base']}\n"
        "models:\n"
        f"  - model: {tiny['add']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {tiny['reverse']}\n    parameters: {{weight: 0.3}}\n"
        "dtype: float32\n"
    )
    return path


def test_a_custom_merge_never_builds_or_reads_the_demo(tmp_path, tiny):
    """Your own mergekit YAML is the source of truth for the parents: with a fresh cache, README's command without
    data is refused at once naming `data=custom data.path=...`; with your data it merges and anneals on it with TRL's
    defaults, and the demo is never built (a real `python -m pipeline`)."""
    from conftest import ONE_THREAD, SHORT, run_cli, run_in_process

    fresh = tmp_path / "fresh-cache"  # the demo's folder too (models.cache_dir follows pipeline.cache_dir)
    config_path = write_task_arithmetic_yaml(tmp_path / "my-merge.yml", tiny)
    custom = ("+merge=custom", f"merge.config_file={config_path}", f"pipeline.cache_dir={fresh}")
    refused = run_in_process(*custom, f"hydra.run.dir={tmp_path / 'refused'}", cwd=tmp_path)
    assert_clean_failure(refused, tmp_path / "refused", "data=custom data.path=", "(base, add, reverse)")
    assert refused.returncode == 2 and not (tmp_path / "refused" / "merge").exists()

    run_dir = tmp_path / "run"
    result = run_cli(
        *custom,
        *tiny.data,
        *SHORT,
        "anneal.trainer.per_device_train_batch_size=4",
        "anneal.trainer.max_length=64",
        "pipeline.stages=[merge,anneal]",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (fresh / "demo").exists() and not demo_dir(fresh).exists()
    stages = manifest.load(run_dir)["stages"]
    assert stages["merge"]["config"]["models"] is None  # the `models` group played no part
    assert {Path(p).name for p in stages["merge"]["inputs"]["models"]} == {"base", "add", "reverse"}
    data = stages["anneal"]["config"]["data"]
    assert data["source"] == "custom" and data["path"] == str(tiny.root / "data" / "train.jsonl")
    assert stages["anneal"]["config"]["anneal"]["trainer"]["learning_rate"] == 1e-6  # TRL's, not the demo's recipe


def test_same_config_is_byte_identical_across_hash_seeds(tmp_path, cache_dir, tiny):
    """Methods without a base model and random ones (DARE, DELLA) give the same bytes whatever the hash seed: a
    subprocess with PYTHONHASHSEED=1 against this process (randomised hashing, a seed of its own)."""
    import sys

    from conftest import ONE_THREAD, base_overrides, run_cli, run_in_process

    assert sys.flags.hash_randomization and os.environ.get("PYTHONHASHSEED") in (None, "", "random")
    methods = "karcher,passthrough,dare_ties,della"  # two without a base model, two random
    outputs = {}
    for seed in ("1", "this process"):
        sweep_dir = tmp_path / f"seed{len(outputs)}"
        args = (
            "-m",
            f"+merge={methods}",
            "pipeline.cache=false",
            MERGE_ONLY,
            *tiny.models,
            *base_overrides(cache_dir),
            f"hydra.sweep.dir={sweep_dir}",
        )
        result = (
            run_cli(*args, cwd=tmp_path, env={"PYTHONHASHSEED": seed, **ONE_THREAD})
            if seed == "1"
            else run_in_process(*args, cwd=tmp_path)
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[seed] = {
            job.name: weight_files(job / "merge" / "model")
            for job in sorted(sweep_dir.iterdir())
            if job.is_dir() and (job / "merge").is_dir()
        }
    assert len(outputs["1"]) == len(methods.split(","))
    assert outputs["1"] == outputs["this process"]


# ----------------------------------------------------------------------------------------------- bad input


def make_variant(src: Path, dst: Path, architecture: str | None = None, **changes) -> Path:
    """A randomly initialised model folder like `src` but with another architecture or shape."""
    config = AutoConfig.from_pretrained(src)
    if architecture:
        config = AutoConfig.for_model(
            "mistral", **{k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        )
        config.architectures = [architecture]
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def assert_clean_failure(result, run_dir: Path, *phrases: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    for phrase in phrases:
        assert phrase in message, message
    state = manifest.load(run_dir)["stages"].get("merge", {}) if run_dir.exists() else {}
    assert state.get("status") != "done"
    assert not (run_dir / "merge" / "model").exists()


def test_missing_merge_lists_the_options_before_creating_a_run_folder(cli):
    result, run_dir = cli(process=True)
    assert result.returncode == 2
    assert "+merge=<option>" in result.stderr and "slerp" in result.stderr and "model_stock" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_unknown_method_group_option(cli):
    result, run_dir = cli("+merge=slurp")
    assert_clean_failure(result, run_dir, "no option 'slurp'", "Did you mean merge=slerp")


def test_unknown_merge_method_name(cli, tiny):
    result, run_dir = cli("+merge=linear", "merge.merge_method=frobnicate", *tiny.models, *tiny.data)
    assert_clean_failure(result, run_dir, "Unknown merge method 'frobnicate'", "slerp")
    assert manifest.load(run_dir)["stages"]["merge"]["status"] == "failed"


def test_missing_parent_folder(cli, tmp_path, tiny):
    missing = tmp_path / "no-such-model"
    result, run_dir = cli("+merge=slerp", "models=local", f"models.parents=[{missing},{missing}-2]", *tiny.data)
    assert_clean_failure(result, run_dir, "Model folder not found", str(missing), "models.parents")


def test_local_without_parents_names_the_fix(make_cfg):
    with pytest.raises(UserError, match="models.parents"):
        merge_config.load(make_cfg("+merge=slerp", "models=local"))


def test_method_needing_a_base_without_one(make_cfg, tiny):
    cfg = make_cfg("+merge=ties", "models=local", f"models.parents=[{tiny['add']},{tiny['reverse']}]")
    with pytest.raises(UserError, match="needs a base model"):
        merge.validate(merge_config.load(cfg)[0])


def test_hub_id_without_network_fails_cleanly(cli, tiny):
    result, run_dir = cli(
        "+merge=slerp",
        "models=local",
        "models.parents=[no-such-org/no-such-model,x/y]",
        *tiny.data,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert_clean_failure(result, run_dir, "Could not fetch no-such-org/no-such-model", "HF_TOKEN")


def test_different_architectures(cli, tmp_path, tiny):
    other = make_variant(tiny["reverse"], tmp_path / "mistral", architecture="MistralForCausalLM")
    result, run_dir = cli("+merge=slerp", "models=local", f"models.parents=[{tiny['add']},{other}]", *tiny.data)
    assert_clean_failure(result, run_dir, "different architectures", "MistralForCausalLM", "allow_crimes")


def test_different_tensor_shapes(cli, tmp_path, tiny):
    other = make_variant(tiny["reverse"], tmp_path / "wide", intermediate_size=256)
    result, run_dir = cli("+merge=linear", "models=local", f"models.parents=[{tiny['add']},{other}]", *tiny.data)
    assert_clean_failure(result, run_dir, "Tensor shapes differ", "mlp", "same base model")


def test_config_mergekit_rejects(cli, tiny):
    result, run_dir = cli("+merge=slerp", "~merge.parameters", *tiny.models, *tiny.data)
    assert_clean_failure(result, run_dir, "needs parameter 't'", "merge.parameters.t")
    result, run_dir = cli("+merge=slerp", "+merge.parameters.density=0.5", *tiny.models, *tiny.data)
    assert_clean_failure(result, run_dir, "has no parameter(s) ['density']")
    result, run_dir = cli("+merge=slerp", "~merge.models", *tiny.models, *tiny.data)
    assert_clean_failure(result, run_dir, "mergekit rejected the merge config", "Exactly one of")


def test_missing_config_file(cli, tmp_path, tiny):
    result, run_dir = cli("+merge=custom", f"merge.config_file={tmp_path / 'nope.yml'}", *tiny.models, *tiny.data)
    assert_clean_failure(result, run_dir, "does not exist", "merge.config_file")
    result, run_dir = cli("+merge=custom", *tiny.models, *tiny.data)
    assert_clean_failure(result, run_dir, "merge.config_file")


def test_help_works_from_any_directory(tmp_path):
    from conftest import ONE_THREAD, run_cli

    result = run_cli("--help", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "merge: " in result.stdout and "slerp" in result.stdout and "+merge=<method>" in result.stdout


def test_fingerprint_is_remembered_only_while_files_are_unchanged(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights one")
    first = models.fingerprint(tmp_path)
    assert models.fingerprint(tmp_path) == first == models.fingerprint(str(tmp_path))
    weights.write_bytes(b"weights two")  # same size; a new modification time
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert models.fingerprint(tmp_path) != first


def test_fingerprint_hashes_big_files_whole(tmp_path):
    import hashlib

    content = os.urandom((16 << 20) + 12345)  # more than one 16 MiB read
    (tmp_path / "model.safetensors").write_bytes(content)
    (tmp_path / "empty.json").write_bytes(b"")
    expected = hashlib.sha256()
    for name, data in (("empty.json", b""), ("model.safetensors", content)):
        expected.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    assert models.fingerprint(tmp_path) == expected.hexdigest()
