"""One process of a launched anneal (stages/anneal/launch.py starts them): `python -m stages.anneal.worker <run>`
runs the anneal stage with the run's saved config, and reports its record (main process) or its error (any
process) as files the pipeline's process reads.
"""

import json
import logging
import os
import sys
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import UserError, logs
from pipeline.artifacts import write_text
from stages import anneal
from stages.anneal.launch import FAULT


def main(run_dir: Path) -> None:
    """One process of a launched anneal: `python -m stages.anneal.worker <run_dir>`."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    work = run_dir / "anneal" / "launch"
    cfg = OmegaConf.load(work / "config.yaml")
    logs.route_library_logs(cfg.pipeline.verbose)
    try:
        if os.environ.get(FAULT) == str(rank):
            raise RuntimeError(f"fault injected on rank {rank} ({FAULT})")
        record = anneal.run(cfg, run_dir)
        if rank == 0:
            write_text(work / "record.json", record.model_dump_json())
    except BaseException as err:
        kind = "user" if isinstance(err, UserError) else "crash"
        message = str(err) if kind == "user" else f"{type(err).__name__}: {err}"
        write_text(
            work / f"error-rank{rank}.json",
            json.dumps(
                {
                    "rank": rank,
                    "world_size": world,
                    "kind": kind,
                    "message": message,
                    "traceback": traceback.format_exc(),
                }
            ),
        )
        raise SystemExit(2 if kind == "user" else 1) from None


if __name__ == "__main__":
    main(Path(sys.argv[1]))
