"""A user's own merge in every form mergekit's tools take (fast tier, the tiny random parents): a mergekit-multi chain
(named intermediates, each cached by content, the final merge annealed, the whole lineage in the manifest and the
card), a mergekit-moe mixture of experts built from dense experts and annealed against a dense parent or all of
them, and the checks after a merge (a tensor missing or misshapen, embeddings that do not cover the tokenizer, a
held-out perplexity far above every parent's)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline import UserError, manifest
from stages import merge
from stages.merge import integrity as merge_check

CHAIN = """\
name: addrev
merge_method: slerp
base_model: {add}
models:
  - model: {add}
  - model: {reverse}
parameters: {{t: {t}}}
dtype: float32
---
merge_method: ties
base_model: {base}
models:
  - model: addrev
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {reverse}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: float32
"""
PROMPTS = "models.expert_prompts=[['12+34=','55+11='],['rev abc=','rev xyz=']]"


def write_chain(path: Path, tiny, t: float = 0.5) -> Path:
    path.write_text(CHAIN.format(add=tiny["add"], reverse=tiny["reverse"], base=tiny["base"], t=t))
    return path


def tensors(folder: Path) -> dict:
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


def assert_refused(result, run_dir: Path, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and all(p in message for p in phrases), message
    assert not (run_dir / "merge" / "model").exists()


# ------------------------------------------------------------------------------------------ mergekit-multi


def test_a_chain_merges_as_mergekit_multi_does_and_its_final_merge_is_annealed_and_released(cli, tmp_path, tiny):
    from mergekit.scripts.multimerge import main as mergekit_multi

    config = write_chain(tmp_path / "chain.yml", tiny)
    result, run_dir = cli("+merge=custom", f"merge.config_file={config}", *tiny.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = manifest.load(run_dir)["stages"]
    assert all(stages[s]["status"] == "done" for s in ("merge", "anneal", "eval", "release"))
    entry = stages["merge"]
    intermediate = Path(entry["outputs"]["intermediates"]["addrev"])
    assert intermediate == run_dir.resolve() / "merge" / "intermediates" / "addrev"
    assert [(s["name"], s["merge_method"]) for s in entry["chain"]] == [("addrev", "slerp"), (None, "ties")]
    assert str(intermediate) in entry["chain"][1]["models"] and entry["merge_method"] == "ties"
    # the models the chain starts from, never an intermediate: what eval compares and the anneal may reference
    assert sorted(Path(p).name for p in entry["inputs"]["models"]) == ["add", "base", "reverse"]
    assert [Path(p).name for p in entry["inputs"]["parents"]] == ["add", "reverse"]
    assert (
        entry["inputs"]["base_model"] == str(tiny["base"])
        and stages["anneal"]["inputs"]["reference_label"] == "base_model"
    )

    # the same tensors mergekit-multi itself writes, intermediate and final
    mergekit_multi(
        [str(config), "-I", str(tmp_path / "mk"), "--out-path", str(tmp_path / "mk-final")], standalone_mode=False
    )
    final = run_dir / "merge" / "model"
    for ours, theirs in ((intermediate, tmp_path / "mk" / "addrev"), (final, tmp_path / "mk-final")):
        expected = tensors(theirs)
        assert expected and {k: torch.equal(v, expected[k]) for k, v in tensors(ours).items()} == {
            k: True for k in expected
        }

    # the whole lineage beside the weights, in the release and on its card (mergekit-multi's own format)
    written = list(yaml.safe_load_all((run_dir / "merge" / "model" / "mergekit_config.yml").read_text()))
    assert [d.get("name") for d in written] == ["addrev", None] and written[1]["models"][0]["model"] == "addrev"
    release = Path(stages["release"]["outputs"]["model"])
    released = list(yaml.safe_load_all((release / "mergekit_config.yml").read_text()))
    assert released[0]["models"] == [{"model": "add"}, {"model": "reverse"}] and released[1]["merge_method"] == "ties"
    card = (release / "README.md").read_text()
    assert "chain of 2 merges (mergekit-multi)" in card
    assert "| merge `addrev` | mergekit 0.1.5 `slerp` of `add`, `reverse`, t=0.5 |" in card
    assert "| merge | mergekit 0.1.5 `ties` of `addrev`, `reverse`, `base`" in card
    # the merge check ran before the anneal, against both parents
    check = stages["anneal"]["merge_check"]
    assert set(check["perplexity"]) == {"merged", "parent:add", "parent:reverse"} and not check["flagged"]
    assert check["ratio"] == pytest.approx(
        check["perplexity"]["merged"] / max(check["perplexity"]["parent:add"], check["perplexity"]["parent:reverse"])
    )

    # each merge cached by content: the same chain again is two hits; another intermediate changes both keys
    again, run_again = cli(
        "+merge=custom",
        f"merge.config_file={config}",
        *tiny.models,
        "pipeline.stages=[merge]",
        run_dir=tmp_path / "again",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    chain = manifest.load(run_again)["stages"]["merge"]["chain"]
    assert [s["cache"] for s in chain] == [s["cache"] | {"merge": "hit"} for s in entry["chain"]]
    changed = write_chain(tmp_path / "chain-t03.yml", tiny, t=0.3)
    other, run_other = cli(
        "+merge=custom",
        f"merge.config_file={changed}",
        *tiny.models,
        "pipeline.stages=[merge]",
        run_dir=tmp_path / "other",
    )
    assert other.returncode == 0, other.stderr[-3000:]
    keys = [s["cache"]["key"] for s in manifest.load(run_other)["stages"]["merge"]["chain"]]
    assert all(k != s["cache"]["key"] for k, s in zip(keys, entry["chain"]))


@pytest.mark.parametrize(
    "documents, phrases",
    [
        (
            "merge_method: linear\nmodels: [{model: A}, {model: B}]\n---\nmerge_method: linear\nmodels: [{model: A}]\n",
            ["2 documents without a `name:`", "leave the final merge unnamed"],
        ),
        (
            "name: a\nmerge_method: linear\nmodels: [{model: b}, {model: X}]\n---\n"
            "name: b\nmerge_method: linear\nmodels: [{model: a}, {model: X}]\n---\n"
            "merge_method: linear\nmodels: [{model: a}, {model: X}]\n",
            ["use each other in a circle"],
        ),
        (
            "name: a\nmerge_method: linear\nmodels: [{model: X}, {model: X}]\n---\n"
            "name: b\nmerge_method: linear\nmodels: [{model: X}, {model: X}]\n",
            ["['a', 'b']", "which one to anneal"],
        ),
        (
            "name: a\nmerge_method: linear\nmodels: [{model: X}]\n---\n"
            "name: a\nmerge_method: linear\nmodels: [{model: a}]\n",
            ["['a'] are used twice"],
        ),
    ],
)
def test_a_chain_that_cannot_run_is_refused_with_the_fix(documents, phrases, cli, tmp_path, tiny):
    config = tmp_path / "chain.yml"
    config.write_text(documents.replace("X", str(tiny["add"])))
    result, run_dir = cli("+merge=custom", f"merge.config_file={config}", *tiny.overrides)
    assert_refused(result, run_dir, *phrases)


# -------------------------------------------------------------------------------------------- mergekit-moe


def test_moe_from_dense_experts_annealed_against_a_dense_parent_and_against_all(cli, tmp_path, tiny):
    result, run_dir = cli("+merge=moe", *tiny.overrides, PROMPTS)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = manifest.load(run_dir)["stages"]
    assert all(stages[s]["status"] == "done" for s in ("merge", "anneal", "eval", "release"))
    merged_dir = Path(stages["merge"]["outputs"]["model"])
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 2
    assert stages["merge"]["merge_method"] == "moe"
    assert [Path(p).name for p in stages["merge"]["inputs"]["parents"]] == ["add", "reverse"]
    # each expert is its dense parent's MLP, everything else the base model's; the routers exist
    merged, base = tensors(merged_dir), tensors(tiny["base"])
    for i, name in enumerate(("add", "reverse")):
        parent = tensors(tiny[name])
        assert torch.equal(
            merged["model.layers.1.mlp.experts.down_proj"][i], parent["model.layers.1.mlp.down_proj.weight"]
        )
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert merged["model.layers.0.mlp.gate.weight"].shape == (2, 16)
    # the tokenizer is the base model's as it is (mergekit-moe's own copy pads on the left with EOS)
    assert json.loads((merged_dir / "tokenizer_config.json").read_text()).get("padding_side") != "left"
    # annealed against the dense base model (anneal.reference=auto), then evaluated and released like any merge
    anneal = stages["anneal"]
    assert anneal["inputs"]["reference_label"] == "base_model"
    assert anneal["inputs"]["reference_path"] == str(tiny["base"])
    annealed = tensors(Path(anneal["outputs"]["model"]))
    assert any(not torch.equal(annealed[k], merged[k]) for k in merged)
    metrics = json.loads(Path(stages["eval"]["outputs"]["metrics"]).read_text())["models"]
    assert set(metrics) == {"parent:add", "parent:reverse", "merged", "annealed"}
    card = Path(stages["release"]["outputs"]["card"]).read_text()
    assert "mixture of experts (mergekit-moe)" in card and "a Mixtral mixture of 2 experts, 2 per token" in card

    # against all the dense parents: the merge a cache hit, each parent's pass its own
    result, run_all = cli(
        "+merge=moe",
        *tiny.overrides,
        PROMPTS,
        "anneal.reference=parents",
        "pipeline.stages=[merge,anneal]",
        run_dir=tmp_path / "all",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stages = manifest.load(run_all)["stages"]
    assert stages["merge"]["cache"]["merge"] == "hit"
    assert list(stages["anneal"]["inputs"]["references"]) == ["add", "reverse"]


def test_your_own_mergekit_moe_yaml_runs_verbatim_and_random_gates_are_seeded(cli, tmp_path, tiny):
    config = tmp_path / "moe.yml"
    config.write_text(
        f"base_model: {tiny['base']}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {tiny['add']}\n  - source_model: {tiny['reverse']}\n"
    )
    routers = []
    for name in ("a", "b"):
        result, run_dir = cli(
            "+merge=custom",
            f"merge.config_file={config}",
            "pipeline.stages=[merge]",
            "pipeline.cache=false",
            run_dir=tmp_path / name,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        merged_dir = Path(manifest.load(run_dir)["stages"]["merge"]["outputs"]["model"])
        routers.append(tensors(merged_dir)["model.layers.0.mlp.gate.weight"])
        assert json.loads((merged_dir / "config.json").read_text())["num_experts_per_tok"] == 1
    assert torch.equal(*routers)  # merge_options.random_seed seeds mergekit-moe's random gates


def test_a_moe_config_that_cannot_be_built_is_refused_with_the_fix(cli, tmp_path, tiny):
    result, run_dir = cli("+merge=moe", *tiny.models, "models.expert_prompts=[null,null]", *tiny.data)
    assert_refused(
        result, run_dir, "mergekit-moe refused the MoE config", "Expert 0 has no positive prompts", "positive_prompts"
    )
    result, run_dir = cli("+merge=moe", *tiny.models, *tiny.data, run_dir=tmp_path / "no-prompts")
    assert_refused(result, run_dir, "expert_prompts", "+merge=moe")  # models=local names no prompts
    result, run_dir = cli(
        "+merge=moe", *tiny.models, PROMPTS, *tiny.data, "merge.gate_mode=best", run_dir=tmp_path / "gate"
    )
    assert_refused(result, run_dir, "no gate_mode 'best'", "cheap_embed")


# ------------------------------------------------------------------------------------------ after a merge


def damaged_copy(tiny, tmp_path: Path, change) -> Path:
    """A copy of the tiny `add` model whose tensors `change` edits (a dict of name -> tensor)."""
    folder = tmp_path / "damaged"
    shutil.copytree(tiny["add"], folder)
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "change, phrase",
    [
        (
            lambda w: w.pop("model.layers.1.mlp.down_proj.weight"),
            "lacks 1 tensor(s) its architecture has (model.layers.1.mlp.down_proj.weight)",
        ),
        (
            lambda w: w.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 16)}),
            "'model.layers.0.self_attn.q_proj.weight' has shape [8, 16] where its config asks for [16, 16]",
        ),
        (lambda w: w["model.norm.weight"].__setitem__(0, float("nan")), "non-finite values in 'model.norm.weight'"),
    ],
)
def test_a_merge_missing_or_misshaping_a_tensor_is_refused(change, phrase, tiny, tmp_path):
    assert merge_check.check_merged(tiny["add"]) is None  # a whole model passes
    with pytest.raises(UserError) as refused:
        merge_check.check_merged(damaged_copy(tiny, tmp_path, change))
    assert phrase in str(refused.value) and "Fix:" in str(refused.value)


def test_embeddings_that_do_not_cover_the_tokenizer_are_refused(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["add"])
    model = AutoModelForCausalLM.from_pretrained(tiny["add"])
    model.resize_token_embeddings(len(tokenizer) - 9)  # config, embeddings and head agree, the tokenizer does not
    model.save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    with pytest.raises(
        UserError, match=f"tokenizer has {len(tokenizer)} tokens but its embeddings only {len(tokenizer) - 9} rows"
    ):
        merge_check.check_merged(tmp_path / "short")


def test_a_gibberish_merge_is_refused_before_the_anneal(cli, tiny):
    """task_arithmetic with lambda 40 multiplies the parents' differences from the base fortyfold: every tensor is
    there and finite, its held-out perplexity is millions where the parents' is about 100."""
    result, run_dir = cli(
        "+merge=task_arithmetic", "merge.parameters.lambda=40", *tiny.overrides, "pipeline.stages=[merge,anneal]"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert "The merge looks broken" in message and "pipeline.merge_check.max_perplexity_ratio=null" in message
    assert "Traceback" not in message
    stages = manifest.load(run_dir)["stages"]
    assert stages["merge"]["status"] == "done" and stages["anneal"]["status"] == "failed"
    assert not (run_dir / "anneal").exists()  # refused before the reference pass and training


def test_merge_options_cuda_auto_follows_torch(make_cfg, tiny):
    cfg = make_cfg("+merge=slerp", *tiny.models)
    assert cfg.merge_options.cuda == "auto"
    assert merge.build_options(cfg.merge_options).cuda is torch.cuda.is_available()
    assert merge.build_options(make_cfg("+merge=slerp", "merge_options.cuda=false").merge_options).cuda is False
