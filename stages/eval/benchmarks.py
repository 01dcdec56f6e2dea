"""Benchmarks through lm-evaluation-harness, paired, and each parent's skills kept (retention).

Every model eval has loaded is wrapped in lm-eval's `HFLM` (no second load from disk) and runs `eval.benchmarks.tasks`
on the same items: a seeded, sorted sample of each task's documents (lm-eval's `samples`, not `limit`'s first N),
with `log_samples`, so every item's value is known per model. Items are matched on (task, doc_id) with equal
`doc_hash`. Per task: each model's score with a bootstrap interval, annealed minus merged and merged minus each
parent, paired. lm-eval's own stderr is not used to compare models.

Retention of a parent's skills: over the items of the parent's own tasks (`eval.benchmarks.parent_tasks`; by default
each task belongs to the parent that scores best on it), chance-corrected, (model - chance) / (parent - chance); a
parent not above chance on them has none. The worst over the parents has a paired interval (the minimum inside each
resample).
"""

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import UserError
from pipeline import metrics as M
from stages.eval.settings import Benchmarks

log = logging.getLogger(__name__)

# The per-item value read from lm-eval's samples: the first of these the task reports.
PREFERRED = ("acc_norm", "acc", "exact_match", "prompt_level_strict_acc")
_TASK_MANAGERS: dict = {}


@dataclass(frozen=True)
class Suite:
    """The tasks (lm-eval Task objects, by name) and the documents of each that every model answers."""

    tasks: dict[str, Any]
    samples: dict[str, list[int]]
    manager: Any  # lm-eval's TaskManager, built once (simple_evaluate would index every built-in task per model)


def task_manager(settings: Benchmarks):
    """lm-eval's task index (the built-in tasks unless every task is local), with `metadata` for tasks that read it
    (the demo's): built once per process for a folder of task files as it stands (indexing the ~15k built-in
    tasks takes 10-18 s, which every job of a sweep would pay)."""
    from lm_eval.tasks import TaskManager

    include = settings.include_path
    stamp = None
    if include:
        folder = Path(include)
        stamp = tuple(
            (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
        )
    local = bool(include) and all((Path(include) / f"{task}.yaml").is_file() for task in settings.tasks)
    key = (include, stamp, local, repr(sorted(settings.metadata.items())))
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=include, include_defaults=not local, metadata=settings.metadata)
    return _TASK_MANAGERS[key]


def check(settings: Benchmarks) -> None:
    """Before any stage runs: every task known to lm-eval, and the documents of the built-in ones readable (from the
    cache, or the hub where it answers); tasks from include_path read theirs when eval runs (the demo's come from
    its held-out pairs, which may not be written yet)."""
    if settings.tasks:
        known(settings)
        index = task_manager(settings).task_index
        include = Path(settings.include_path).resolve() if settings.include_path else None
        own = lambda t: include is not None and include in Path(getattr(index[t], "yaml_path", "/")).resolve().parents
        load([t for t in settings.tasks if not own(t)], settings)


def known(settings: Benchmarks) -> list[str]:
    manager = task_manager(settings)
    unknown = [t for t in settings.tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"eval.benchmarks.tasks: lm-evaluation-harness knows no task {unknown} (include_path: "
            f"{settings.include_path}). Fix: check the spelling (`lm-eval ls tasks` lists the built-in ones), or put "
            "your task's YAML in a folder and set eval.benchmarks.include_path to it, or eval/benchmarks=none."
        )
    return list(settings.tasks)


def load(tasks: list[str], settings: Benchmarks) -> dict:
    """lm-eval's Task objects, their documents read: from local files and the cache first (no network), from the
    hub only where that fails and the hub answers; refused, naming the fixes, when neither can."""
    if not tasks:
        return {}
    try:
        return read(tasks, settings, offline=True)
    except Exception as err:  # a data set not cached (or a broken task file)
        cached = err
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or not hub_reachable()
    if not offline:
        try:
            return read(tasks, settings, offline=False)
        except Exception as err:
            cached = err
    reason = " ".join(str(cached).split())[:300]
    raise UserError(
        f"The benchmark tasks {tasks} could not be loaded ({type(cached).__name__}: {reason})"
        f"{'; the Hugging Face hub cannot be reached from here' if offline else ''}. Their data sets come from "
        "the hub, or from its cache. Fix: fill the cache where the hub is reachable, point "
        "eval.benchmarks.include_path at local task YAMLs, or turn benchmarks off with eval/benchmarks=none."
    ) from None


def read(tasks: list[str], settings: Benchmarks, offline: bool) -> dict:
    from unittest import mock

    import datasets
    from lm_eval.tasks import get_task_dict

    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE or offline):
        return leaves(get_task_dict(tasks, task_manager(settings)))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host answers (HF_ENDPOINT), within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def prepare(settings: Benchmarks, seed: int) -> Suite | None:
    """The suite: every task loaded and its items drawn (a seeded sample, sorted). None without tasks."""
    if not settings.tasks:
        return None
    loaded = load(known(settings), settings)
    order = lambda name: settings.tasks.index(name) if name in settings.tasks else len(settings.tasks)  # a group's
    tasks = {name: loaded[name] for name in sorted(loaded, key=order)}  # tasks after the named ones
    samples = {}
    for name, task in tasks.items():
        n = len(task.eval_docs)
        k = n if settings.items is None else min(settings.items, n)
        samples[name] = sorted(random.Random(f"{seed}:{name}").sample(range(n), k))
    return Suite(tasks, samples, task_manager(settings))


def leaves(task_dict: dict) -> dict:
    """lm-eval's task dict with groups flattened into their tasks, by name."""
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(leaves(value))
        else:
            out[getattr(key, "group_name", None) or str(key)] = value
    return out


def run(model, tokenizer, suite: Suite, batch_size: int, num_fewshot: int | None) -> dict:
    """One model on every item of the suite, through lm-eval's HFLM around the loaded model. Per task: the metric
    read, and per doc_id (value, chance, doc_hash); chance is 1 / choices for multiple choice, 0 for generation."""
    from unittest import mock

    import lm_eval
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    quiet = (  # what lm-eval adds to its own results file, which eval does not write: `git describe`, collect_env
        mock.patch.object(evaluator, "get_git_commit_hash", lambda: None),
        mock.patch.object(evaluator, "add_env_info", lambda storage: None),
    )
    with quiet[0], quiet[1]:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(suite.tasks.values()),
            samples=suite.samples,
            task_manager=suite.manager,
            log_samples=True,
            bootstrap_iters=0,
            num_fewshot=num_fewshot,
        )
    out = {}
    for name in suite.tasks:  # in the suite's order
        samples = results["samples"][name]
        multiple_choice = suite.tasks[name].OUTPUT_TYPE == "multiple_choice"
        metric = next(key for key in PREFERRED if key in samples[0])
        items, texts = {}, {}
        for sample in samples:  # a task with several filters logs each document once per filter: the first counts
            if sample["doc_id"] not in items:
                chance = 1 / len(sample["arguments"]) if multiple_choice else 0.0
                items[sample["doc_id"]] = (float(sample[metric]), chance, sample["doc_hash"])
                texts[sample["doc_id"]] = str(sample["arguments"][0][0])
        out[name] = {"metric": metric, "items": items, "texts": texts}
    return out


def matched(a: dict, b: dict) -> list:
    """The doc_ids both models answered, of the same document (equal doc_hash)."""
    return [doc for doc in a if doc in b and a[doc][2] == b[doc][2]]


def values(items: dict, docs: list, which: int = 0) -> list[float]:
    return [items[doc][which] for doc in docs]


def owners(per_model: dict, parents: list[str], parent_tasks: dict | None) -> dict[str, list[str]]:
    """Which tasks are each parent's own (parent folder name -> tasks): `eval.benchmarks.parent_tasks` as given,
    else every task belongs to the parent that scores best on it."""
    tasks = list(next(iter(per_model.values())))
    if parent_tasks is not None:
        wrong = {p: ts for p, ts in parent_tasks.items() if p not in parents or not set(ts) <= set(tasks)}
        if wrong:
            raise UserError(
                f"eval.benchmarks.parent_tasks names {wrong}, but the parents are {parents} and the tasks {tasks}. "
                f"Fix: map each parent's folder name to its own tasks, e.g. eval.benchmarks.parent_tasks="
                f"'{{{parents[0]}: [{tasks[0]}]}}', or null (each task is the best parent's on it)."
            )
        return {p: list(ts) for p, ts in parent_tasks.items()}
    mean = lambda p, t: (
        sum(v for v, _, _ in per_model[f"parent:{p}"][t]["items"].values())
        / max(len(per_model[f"parent:{p}"][t]["items"]), 1)
    )
    out = {p: [] for p in parents}
    for task in tasks:
        out[max(parents, key=lambda p: mean(p, task))].append(task)
    return {p: ts for p, ts in out.items() if ts}


def summarize(per_model: dict, parent_tasks: dict | None, resamples: int, seed: int) -> dict:
    """Each model's score per task with its interval; annealed - merged and merged - each parent, paired; each
    parent's own tasks and, for the merged and the annealed model, the chance-corrected retention of each parent's
    skills with the worst; the documents that could not be paired, counted."""
    parents = sorted(name.removeprefix("parent:") for name in per_model if name.startswith("parent:"))
    tasks = list(per_model["merged"])
    items = {name: {t: runs[t]["items"] for t in tasks} for name, runs in per_model.items()}
    scores = {
        name: {t: sum(values(its[t], list(its[t]))) / max(len(its[t]), 1) for t in tasks} for name, its in items.items()
    }
    ci95 = {
        name: {t: M.bootstrap_ci(values(its[t], list(its[t])), resamples, seed) for t in tasks}
        for name, its in items.items()
    }
    paired = lambda a, b, t: M.paired_bootstrap(
        *(values(items[m][t], matched(items[a][t], items[b][t])) for m in (a, b)), resamples, seed
    )
    own = owners(per_model, parents, parent_tasks)
    return {
        "tasks": {
            t: {
                "metric": per_model["merged"][t]["metric"],
                "items": len(items["merged"][t]),
                "chance": sum(values(items["merged"][t], list(items["merged"][t]), 1))
                / max(len(items["merged"][t]), 1),
            }
            for t in tasks
        },
        "scores": scores,
        "ci95": ci95,
        "parent_tasks": own,
        "annealed_vs_merged": {t: paired("annealed", "merged", t) for t in tasks},
        "merged_vs_parents": {p: {t: paired("merged", f"parent:{p}", t) for t in tasks} for p in parents},
        "retention": {name: retention(items, name, own, resamples, seed) for name in ("merged", "annealed")},
        "items": {
            name: {
                t: {
                    "docs": [[doc, its[t][doc][2]] for doc in sorted(its[t])],
                    "values": [its[t][doc][0] for doc in sorted(its[t])],
                }
                for t in tasks
            }
            for name, its in items.items()
        },
        "unmatched": sum(
            len(items["merged"][t]) - len(matched(items["merged"][t], items[name][t])) for name in items for t in tasks
        ),
    }


def retention(items: dict, name: str, own: dict[str, list[str]], resamples: int, seed: int) -> dict:
    """`name`'s chance-corrected retention of each parent's skills over that parent's own tasks' paired items."""
    model, parent, chance = {}, {}, {}
    for p, tasks in own.items():
        pairs = [(t, doc) for t in tasks for doc in matched(items[name][t], items[f"parent:{p}"][t])]
        model[p] = [items[name][t][doc][0] for t, doc in pairs]
        parent[p] = [items[f"parent:{p}"][t][doc][0] for t, doc in pairs]
        chance[p] = [items[name][t][doc][1] for t, doc in pairs]
    value, interval = M.retention(model, parent, chance, resamples, seed)
    return {"value": value, "ci95": interval}
