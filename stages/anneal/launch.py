"""The anneal stage on more than one process, from the same `python -m pipeline` command (`distributed=...`).

The pipeline runs in one process; when it reaches the anneal it writes the run's config and an accelerate config
file (`distributed.*`, accelerate's own field names) to `<run>/anneal/launch/`, and starts

    accelerate launch --config_file <run>/anneal/launch/accelerate.yaml -m stages.anneal.worker <run>

(under `srun`, one task per node, for `distributed=slurm`). Every process runs `stages.anneal.run`: the
reference pass is split across them, training is data-parallel or sharded (FSDP2, DeepSpeed ZeRO-3), and the
main process alone writes the stage's outputs and its record, which the pipeline reads back. Merge, eval and
release run once, in the pipeline's own process, and only it writes the manifest. A failure on any process
stops them all (torch's elastic agent) and fails the stage with that process's message.
"""

import codecs
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import UserError, records
from pipeline.artifacts import write_text

log = logging.getLogger(__name__)
LAUNCHED = "MERGE_ANNEAL_LAUNCHED"  # set in the launched processes: they run the stage, not another launch
FAULT = "MERGE_ANNEAL_FAULT_RANK"  # tests: the process of this rank fails before annealing
NOT_ACCELERATE = ("launcher", "gpus_per_node", "srun")  # distributed.* keys that are merge-anneal's own


def launched() -> bool:
    """True in a process this module started (stages/anneal/worker.py)."""
    return bool(os.environ.get(LAUNCHED))


def wanted(dist: DictConfig) -> bool:
    """True in the pipeline's process when the anneal is to run on more processes (`distributed`)."""
    return bool(dist.get("launcher")) and not launched()


def sharding(dist: DictConfig) -> str:
    """How the launched processes share the model: none (each holds it whole), fsdp2 or zero3."""
    return {"FSDP": "fsdp2", "DEEPSPEED": "zero3"}.get(dist.get("distributed_type") if dist.launcher else None, "none")


def accelerate_config(dist: DictConfig, processes: int) -> dict:
    """The accelerate config file's fields from `distributed.*` (merge-anneal's own keys left out)."""
    fields = {k: v for k, v in OmegaConf.to_container(dist, resolve=True).items() if k not in NOT_ACCELERATE}
    return {**fields, "num_processes": processes}


def processes(dist: DictConfig) -> int:
    """How many processes `distributed` starts on this machine's GPUs."""
    import torch

    return total_processes(dist, torch.cuda.device_count())


def total_processes(dist: DictConfig, cuda_devices: int) -> int:
    """`distributed.num_processes`, accelerate's total over all machines (`all`: every GPU of every machine)."""
    if dist.num_processes != "all":
        return int(dist.num_processes)
    return int(dist.get("gpus_per_node") or cuda_devices) * int(dist.num_machines)


def launch_command(dist: DictConfig, config_file: Path, run_dir: Path, head: str) -> list[str]:
    """The command that starts the anneal's processes: accelerate launch, or for Slurm, srun running accelerate
    launch once per node (machine rank = the node's SLURM_NODEID, rendezvous on this node, `head`)."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    script = ["-m", "stages.anneal.worker", str(run_dir)]
    if dist.launcher == "accelerate":
        return [*accelerate, *script]
    if dist.launcher != "slurm":
        raise UserError(
            f"distributed.launcher={dist.launcher} is not a launcher. Fix: accelerate or slurm "
            "(distributed=ddp, fsdp2, zero3 or slurm choose one)."
        )
    nodes = int(dist.num_machines)
    per_node = [
        *accelerate,
        "--num_machines",
        str(nodes),
        "--machine_rank",
        "$SLURM_NODEID",
        "--main_process_ip",
        head,
        "--main_process_port",
        str(dist.main_process_port),
        *script,
    ]
    return [
        "srun",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        *dist.get("srun", []),
        "bash",
        "-c",
        " ".join(a if a.startswith("$") else shlex.quote(a) for a in per_node),
    ]


def check_machine(dist: DictConfig, processes: int) -> None:
    """Refuse what this machine cannot run, before anything starts."""
    import importlib.util

    import torch

    cuda = torch.cuda.device_count()
    kind = dist.distributed_type
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "distributed=zero3 needs DeepSpeed, which is not installed. Fix: pip install deepspeed "
            "(on a CUDA machine), or use distributed=fsdp2 (PyTorch's own sharding) or distributed=ddp."
        )
    if dist.get("use_cpu"):
        if kind != "MULTI_GPU":  # accelerate runs FSDP on CPU processes as plain data parallelism
            raise UserError(
                f"distributed.use_cpu=true runs data-parallel CPU processes (gloo), not {kind} "
                "(accelerate would run it as plain data parallelism). Fix: distributed=ddp "
                "distributed.use_cpu=true, or a CUDA machine for sharding."
            )
        return
    if dist.launcher == "slurm" and not (os.environ.get("SLURM_JOB_ID") and shutil.which("srun")):
        raise UserError(
            "distributed=slurm starts the anneal with srun inside a Slurm allocation, and this process is "
            "not in one. Fix: run the pipeline as a job (e.g. sbatch --nodes=2 --gpus-per-node=8 --wrap "
            '"python -m pipeline ... distributed=slurm distributed.num_machines=2"), or distributed=ddp '
            "on one machine."
        )
    if dist.launcher == "accelerate" and not 0 < processes <= cuda:
        raise UserError(
            f"distributed.num_processes={processes} but this machine has {cuda} CUDA device(s). Fix: "
            f"distributed.num_processes={cuda or 1} (one per GPU), distributed=none for one process, or "
            "distributed.use_cpu=true to rehearse with CPU processes (ddp only)."
        )


def run(cfg: DictConfig, run_dir: Path, train_pairs: int) -> records.AnnealRecord:
    """The anneal on `distributed.num_processes` processes, each running the stage with `cfg` (the whole config: the
    stage itself runs there); returns the main process's record."""
    dist, run_dir = cfg.distributed, Path(run_dir)
    count = processes(dist)
    check_machine(dist, count)
    if train_pairs < count:
        raise UserError(
            f"The anneal would run on {count} processes but has only {train_pairs} training "
            "pairs: every process needs at least one. Fix: fewer processes (distributed.num_processes), "
            "or more data."
        )
    work = run_dir / "anneal" / "launch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    OmegaConf.save(cfg, work / "config.yaml", resolve=True)
    config_file = write_text(work / "accelerate.yaml", OmegaConf.to_yaml(accelerate_config(dist, count)))
    command = launch_command(dist, config_file, run_dir, socket.gethostname())
    env = {**os.environ, LAUNCHED: "1", **({"ACCELERATE_USE_CPU": "true"} if dist.get("use_cpu") else {})}
    log.info(
        f"anneal: {count} processes ({dist.distributed_type}{', CPU' if dist.get('use_cpu') else ''}); "
        f"their output: {work / 'processes.log'}"
    )
    with (
        open(work / "processes.log", "wb") as out,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc,
    ):
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):  # progress bars too: to the console and the log
            out.write(chunk)
            sys.stderr.write(text.decode(chunk))
            sys.stderr.flush()
        returncode = proc.wait()
    if returncode != 0:
        raise failure(work, returncode)
    return records.AnnealRecord.model_validate_json((work / "record.json").read_text())


def failure(work: Path, returncode: int) -> UserError:
    """The first failed process's own message (a user mistake is reported as such), else the launcher's."""
    reports = [json.loads(p.read_text()) for p in sorted(work.glob("error-rank*.json"))]
    user = [r for r in reports if r["kind"] == "user"]
    if user:
        return UserError(user[0]["message"])
    where = f"Every process's output: {work / 'processes.log'}."
    if reports:
        first = reports[0]
        return UserError(
            f"The anneal failed on rank {first['rank']} of {first['world_size']}: {first['message']}. "
            f"The other processes were stopped. {where}"
        )
    return UserError(
        f"The anneal's processes failed (launcher exit code {returncode}) before reporting an error. {where}"
    )
