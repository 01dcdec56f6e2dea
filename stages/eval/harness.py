"""Optional lm-evaluation-harness scores for the eval stage (config block ``eval.lm_eval``).

``run_lm_eval(lm_cfg, model_dirs)`` runs ``lm_eval.simple_evaluate`` with the "hf" backend on each local
model folder and returns ``{model_name: {task: {metric: value}}}``. lm_eval, datasets and torch are
imported inside the function, so the pipeline imports (and runs with ``eval.lm_eval=null``) without them.
"""

from __future__ import annotations

import gc
import math
import numbers
import pathlib
from unittest import mock

from pipeline import UserError


def check(lm_cfg: dict) -> tuple[list[str], object]:
    """lm-evaluation-harness importable and every task in `lm_cfg["tasks"]` known to it (lm_eval itself finds an
    unknown name only after loading a model, as a bare KeyError): the tasks and the task index."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(
            f"eval.lm_eval is set, but lm-evaluation-harness cannot be imported ({e}). Install it with "
            '`pip install "merge-anneal[lm_eval]"`, or set `eval.lm_eval=null` to skip it.'
        ) from e
    tasks = lm_cfg["tasks"]
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    include_path = lm_cfg.get("include_path")
    task_manager = _task_manager(TaskManager, str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in task_manager.all_tasks and not pathlib.Path(t).is_file()]
    if unknown:
        raise UserError(
            f"eval.lm_eval.tasks: unknown lm-evaluation-harness task(s) {unknown} (include_path: "
            f"{include_path}). Check the spelling (`lm-eval ls tasks` lists the built-in ones); for a custom "
            "task, put its YAML file in a folder and set `eval.lm_eval.include_path` to that folder (lm_eval "
            "silently skips a YAML file it cannot parse, so check that file too)."
        )
    return tasks, task_manager


def run_lm_eval(lm_cfg: dict, model_dirs: dict[str, pathlib.Path]) -> dict:
    """Score each ``name -> local model folder`` on ``lm_cfg["tasks"]``; numbers only, ready for JSON."""
    tasks, task_manager = check(lm_cfg)
    import datasets
    import lm_eval
    import torch
    from lm_eval.utils import simple_parse_args_string

    scores = {}
    # datasets pings S3 ("download counts") each time a packaged builder such as "json" loads a local
    # file, unless HF_HUB_OFFLINE was set before it was imported: switch that off for this call only.
    with mock.patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False):
        for name, model_dir in model_dirs.items():
            # Absolute: lm_eval's report also asks the Hub about "pretrained" (HfApi().model_info), and
            # an absolute path is rejected as a repo id before any request is made.
            model_args = {
                "pretrained": str(pathlib.Path(model_dir).resolve()),
                "dtype": "float32",
                "trust_remote_code": False,
            }
            model_args |= simple_parse_args_string(lm_cfg.get("model_args"))  # e.g. "dtype=bfloat16"
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args=model_args,
                tasks=tasks,
                task_manager=task_manager,
                num_fewshot=lm_cfg.get("num_fewshot"),
                limit=lm_cfg.get("limit"),
                batch_size=lm_cfg.get("batch_size", 8),
                device=lm_cfg.get("device", "cpu"),
                log_samples=False,
            )
            scores[name] = {task: _numbers(metrics) for task, metrics in results["results"].items()}
            del results  # the model goes with it
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return scores


_TASK_MANAGERS = {}


def _task_manager(task_manager_class, include_path: str | None):
    """lm_eval's task index, built once per process for a folder of custom tasks as it stands (its YAML files'
    names, sizes and times): indexing the ~15k built-in tasks takes 11-18 s, which every job of a sweep paid."""
    stamp = None
    if include_path:
        stamp = tuple(
            (str(p), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(pathlib.Path(include_path).rglob("*"))
            if p.is_file()
        )
    key = (include_path, stamp)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = task_manager_class(include_path=include_path)
    return _TASK_MANAGERS[key]


def _numbers(metrics: dict) -> dict:
    """Finite numbers only ("acc,none", "acc_stderr,none", "sample_len", ...): drops "alias", "name", "N/A"."""
    return {
        k: int(v) if isinstance(v, numbers.Integral) else float(v)
        for k, v in metrics.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    }
