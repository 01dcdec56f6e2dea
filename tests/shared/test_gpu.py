"""The GPU path (`gpu` marker): a CUDA merge and a bf16-autocast anneal on the tiny parents. Skipped cleanly
without CUDA (conftest.py); run on a GPU machine with `pytest -m gpu -p no:xdist`."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.app import run_pipeline

pytestmark = pytest.mark.gpu


def test_cuda_merge_and_bf16_anneal(make_cfg, tiny, tmp_path):
    cfg = make_cfg("+merge=slerp", *tiny.overrides, "pipeline.stages=[merge,anneal,eval]", "anneal.trainer.bf16=auto")
    stages = run_pipeline(cfg, tmp_path)["stages"]
    assert all(stages[name]["status"] == "done" for name in ("merge", "anneal", "eval"))
    assert stages["merge"]["config"]["merge_options"]["cuda"] is True  # merge_options.cuda=auto: the GPU
    assert stages["anneal"]["merge_check"]["ratio"] < 10  # the merge check scored on the GPU, in bf16
    # bf16 autocast on a CUDA GPU with bf16, attention left in bf16 there, float32 master weights saved
    assert stages["anneal"]["precision"]["autocast"] == "bfloat16"
    assert stages["anneal"]["precision"]["attention"] == "bfloat16"
    merged = load_file(Path(stages["merge"]["outputs"]["model"]) / "model.safetensors")
    annealed = load_file(Path(stages["anneal"]["outputs"]["model"]) / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in [*merged.values(), *annealed.values()])
    assert all(t.dtype == torch.float32 for t in annealed.values())
    assert any(not torch.equal(merged[k], annealed[k]) for k in merged)


def test_qlora_anneal_on_a_4bit_base(make_cfg, tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg("+merge=slerp", *tiny.overrides, "anneal=qlora", "anneal.peft.r=4")
    entry = run_pipeline(cfg, tmp_path)["stages"]["anneal"]
    assert entry["status"] == "done" and entry["precision"]["frozen_linear_weights"] == "nf4"
    assert entry["memory_plan"]["settings"]["mode"] == "qlora" and entry["memory_plan"]["device"] == "cuda"
    annealed = load_file(Path(entry["outputs"]["model"]) / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in annealed.values())


@pytest.mark.parametrize("preset", ["ddp", "fsdp2"])
def test_two_gpus(preset, make_cfg, tiny, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    cfg = make_cfg(
        "+merge=slerp",
        *tiny.overrides,
        f"distributed={preset}",
        "distributed.num_processes=2",
        "anneal.trainer.bf16=true",
    )
    entry = run_pipeline(cfg, tmp_path)["stages"]["anneal"]
    assert entry["status"] == "done" and entry["processes"] == 2
    annealed = load_file(Path(entry["outputs"]["model"]) / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in annealed.values())


def test_moe_gates_from_hidden_states_on_the_gpu(make_cfg, tiny, tmp_path):
    """mergekit-moe computes gate_mode=hidden's hidden states on the GPU (merge_options.cuda=auto): the routers
    equal, up to the GPU's rounding, those of the same merge on the CPU, and are not the random gates; the mixture
    anneals in bf16 there."""
    overrides = ["+merge=moe", *tiny.overrides, "models.expert_prompts=[['12+34='],['rev abc=']]"]
    cfg = make_cfg(*overrides, "pipeline.stages=[merge,anneal]", "anneal.trainer.bf16=auto")
    stages = run_pipeline(cfg, tmp_path / "gpu")["stages"]
    assert stages["merge"]["merge_method"] == "moe" and stages["merge"]["config"]["merge_options"]["device"] == "cuda"
    assert stages["anneal"]["status"] == "done" and stages["anneal"]["precision"]["autocast"] == "bfloat16"
    routers = {}
    for where, extra in (("cpu", ["merge_options.cuda=false"]), ("random", ["merge.gate_mode=random"])):
        entry = run_pipeline(make_cfg(*overrides, "pipeline.stages=[merge]", *extra), tmp_path / where)["stages"]
        routers[where] = load_file(Path(entry["merge"]["outputs"]["model"]) / "model.safetensors")
    gpu = load_file(Path(stages["merge"]["outputs"]["model"]) / "model.safetensors")
    gates = [name for name in gpu if name.endswith("mlp.gate.weight")]
    assert gates and all(torch.allclose(gpu[g], routers["cpu"][g], rtol=1e-2, atol=1e-3) for g in gates)
    assert not any(torch.allclose(gpu[g], routers["random"][g]) for g in gates)
