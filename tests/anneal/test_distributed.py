"""The anneal on more than one process (`distributed=...`): two CPU processes with the gloo backend under
accelerate launch, against one process; the presets as accelerate reads them; the machine checks."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_THREAD, write_jsonl
from pipeline import UserError, manifest, preferences
from pipeline.app import run_pipeline
from stages.anneal import launch

TWO_CPU_PROCESSES = ["distributed=ddp", "distributed.use_cpu=true", "distributed.num_processes=2"]


@pytest.fixture
def compose_cfg(make_cfg, tiny):
    # TRL's random order: one permutation of the pairs, whatever the per-device batch, so one process and two see the
    # same global batches (length-grouped batches, the default, are grouped per device batch). The sigmoid loss alone:
    # it is a mean over pairs; the default's SFT term is a mean over each process's tokens, which two processes of
    # unequal token counts average differently from one (TRL's per-device loss)
    return lambda *overrides: make_cfg(
        "+merge=slerp",
        "pipeline.stages=[merge,anneal]",
        "pipeline.cache=false",
        "anneal.trainer.train_sampling_strategy=random",
        "anneal.trainer.loss_type=[sigmoid]",
        "anneal.trainer.loss_weights=null",
        *tiny.overrides,
        *overrides,
    )


def test_two_cpu_processes_anneal_as_one_with_the_same_global_batch(compose_cfg, tmp_path, monkeypatch):
    """Data-parallel over two gloo CPU processes against one process, the same global batch: the same reference
    store, the same trained weights. (accelerate runs FSDP on CPU processes as plain data parallelism: the
    sharded presets are checked on GPUs, tests/shared/test_gpu.py.)"""
    for name, value in ONE_THREAD.items():  # the launched processes: one thread each, as this one
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a matrix product's summation order depends on the threads
    try:
        one = run_pipeline(compose_cfg("anneal.trainer.per_device_train_batch_size=8"), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    a = one["stages"]["anneal"]
    assert a["status"] == "done" and a["processes"] == 1 and a["distributed_type"] == "NO"
    merged = load_file(tmp_path / "one" / "merge" / "model" / "model.safetensors")
    expected = load_file(Path(a["outputs"]["model"]) / "model.safetensors")
    store = preferences.read_store(Path(a["outputs"]["reference_logps"]))
    for preset, engine in (("ddp", "MULTI_CPU"),):
        run_dir = tmp_path / preset
        b = run_pipeline(
            compose_cfg(
                "anneal.trainer.per_device_train_batch_size=4", f"distributed={preset}", *TWO_CPU_PROCESSES[1:]
            ),
            run_dir,
        )["stages"]["anneal"]
        assert b["status"] == "done" and b["processes"] == 2 and b["distributed_type"] == engine
        # the reference pass, split over two processes, makes the one-process store
        two_store = preferences.read_store(Path(b["outputs"]["reference_logps"]))
        for split in ("train", "heldout"):
            assert two_store[split].to_dict() == store[split].to_dict(), (preset, split)
        # the same global batch (2 x 4 = 8) trains the same weights
        weights = load_file(Path(b["outputs"]["model"]) / "model.safetensors")
        assert weights.keys() == expected.keys()
        for name in weights:
            torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{preset} {name}")
        assert any(not torch.equal(weights[k], merged[k]) for k in merged)
        # one process wrote the outputs: one log line per logging step, one record, no error reports
        lines = [json.loads(line) for line in Path(b["outputs"]["metrics"]).read_text().splitlines()]
        steps = [line["step"] for line in lines if "loss" in line]
        assert steps and len(steps) == len(set(steps))
        launched = run_dir / "anneal" / "launch"
        assert (launched / "record.json").is_file() and not list(launched.glob("error-rank*.json"))
        assert (launched / "processes.log").stat().st_size > 0


def test_a_failure_on_one_process_fails_the_run_with_its_message(cli, tiny, monkeypatch):
    monkeypatch.setenv(launch.FAULT, "1")  # read by the launched processes
    result, run_dir = cli("+merge=slerp", *tiny.overrides, *TWO_CPU_PROCESSES)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "failed on rank 1 of 2" in result.stderr and "fault injected" in result.stderr
    assert "Traceback" not in result.stderr.split("merge-anneal: error:")[-1]
    stages = manifest.load(run_dir)["stages"]
    assert stages["merge"]["status"] == "done" and stages["anneal"]["status"] == "failed"
    assert "eval" not in stages and not (run_dir / "anneal" / "model").exists()


def test_more_processes_than_pairs_is_refused(cli, tiny, tmp_path):
    pairs = [json.loads(line) for line in (tiny.root / "data" / "train.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "one.jsonl", pairs[:1])
    data = [
        "data=custom",
        "eval/benchmarks=none",
        f"data.path={tmp_path / 'one.jsonl'}",
        f"data.heldout.path={tiny.root}/data/heldout.jsonl",
    ]
    result, run_dir = cli("+merge=slerp", *tiny.models, *data, "anneal.trainer.max_length=64", *TWO_CPU_PROCESSES)
    assert result.returncode == 2
    assert "2 processes but has only 1 training pairs" in result.stderr and "distributed.num_processes" in result.stderr
    assert manifest.load(run_dir)["stages"]["anneal"]["status"] == "failed"


@pytest.mark.parametrize(
    "preset, message",
    [
        ("distributed=ddp", "this machine has 0 CUDA device(s)"),
        ("distributed=ddp distributed.num_processes=all", "this machine has 0 CUDA device(s)"),
        ("distributed=zero3", "needs DeepSpeed, which is not installed"),
        ("distributed=fsdp2 distributed.use_cpu=true", "not FSDP"),
        ("distributed=slurm", "not in one"),
    ],
)
def test_a_preset_this_machine_cannot_run_is_refused_before_any_stage(preset, message, make_cfg, tiny):
    """`anneal.check`, which the app runs before the first stage."""
    from stages import anneal

    if torch.cuda.is_available():
        pytest.skip("a machine without CUDA")
    processes = [] if "num_processes" in preset else ["distributed.num_processes=2"]
    with pytest.raises(UserError) as refused:
        anneal.check(make_cfg("+merge=slerp", *tiny.overrides, *preset.split(), *processes))
    assert message in " ".join(str(refused.value).split()) and "Fix:" in str(refused.value)


@pytest.mark.parametrize("preset", ["ddp", "fsdp2", "zero3", "slurm"])
def test_presets_are_accelerate_config_files(preset, make_cfg, tmp_path):
    """Each preset, written as the stage writes it, loads through accelerate's own config class."""
    from accelerate.commands.config.config_args import ClusterConfig

    dist = make_cfg("+merge=slerp", f"distributed={preset}").distributed
    fields = launch.accelerate_config(dist, 8)
    (tmp_path / "accelerate.yaml").write_text(json.dumps(fields))
    config = ClusterConfig.from_yaml_file(tmp_path / "accelerate.yaml")
    assert (
        config.num_processes == 8
        and config.distributed_type.value
        == {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED", "slurm": "MULTI_GPU"}[preset]
    )
    if preset == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if preset == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3


def test_slurm_runs_accelerate_once_per_node(make_cfg, tmp_path):
    dist = make_cfg(
        "+merge=slerp",
        "distributed=slurm",
        "distributed.num_machines=2",
        "distributed.gpus_per_node=4",
        "distributed.srun=['--cpus-per-task=16']",
    ).distributed
    assert launch.total_processes(dist, cuda_devices=0) == 8
    command = launch.launch_command(dist, tmp_path / "accelerate.yaml", tmp_path / "run", head="node-a")
    assert command[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16"]
    assert command[4:6] == ["bash", "-c"]
    per_node = command[6]
    assert "accelerate.commands.launch" in per_node and "--num_machines 2" in per_node
    assert "--machine_rank $SLURM_NODEID" in per_node and "--main_process_ip node-a" in per_node
    assert per_node.endswith(f"-m stages.anneal.worker {tmp_path / 'run'}")
    assert launch.accelerate_config(dist, 8)["num_machines"] == 2
    assert "srun" not in launch.accelerate_config(dist, 8)  # merge-anneal's own keys stay out of accelerate's file
