"""Sweeps: real `python -m pipeline -m ...` multiruns on the tiny random parents and pairs (fast tier, a short
anneal), their summaries, the presets (conf/sweep/), the Optuna search and the submitit launcher."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import ONE_THREAD, TEST_CACHE, eval_report, run_cli, run_in_process
from pipeline import UserError, manifest, sweep
from pipeline.settings import DataSettings

# A short anneal (the summary, not the annealing effect, is under test); release is another stage's business.
SHORT = [
    "anneal.trainer.max_steps=10",
    "anneal.trainer.logging_steps=5",
    "anneal.trainer.save_steps=1000",
    "anneal.trainer.disable_tqdm=true",
    "pipeline.stages=[merge,anneal,eval]",
    "eval.samples=1",
]


@pytest.fixture(scope="module")
def demo_subset(tiny) -> list[str]:
    """The tiny parents and their demo-style pairs (both skills, exact answers): every job merges, anneals and
    evaluates in seconds."""
    return [*tiny.models, *tiny.data, "anneal.trainer.per_device_train_batch_size=4"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One result cache for the module, as one user's sweeps share theirs."""
    return tmp_path_factory.mktemp("sweep-cache")


def sweep_cli(sweep_dir: Path, cache: Path, data: list[str], *args: str):
    """`python -m pipeline` with a sweep, through the same entry point in this process (one torch thread, as the
    xdist workers run): Hydra's basic launcher runs every job in one process anyway."""
    result = run_in_process(
        *args,
        *SHORT,
        *data,
        f"pipeline.cache_dir={cache}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=sweep_dir.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((sweep_dir / sweep.SUMMARY_JSON).read_text()), result


def check_summary_files(sweep_dir: Path, summary: dict) -> str:
    assert summary["complete"] and summary["jobs"]["done"] == summary["jobs"]["total"] == len(summary["runs"])
    assert (sweep_dir / sweep.SUMMARY_PNG).read_bytes()[:4] == b"\x89PNG"
    markdown = (sweep_dir / sweep.SUMMARY_MD).read_text()
    for run in summary["runs"]:
        assert run["label"] in markdown
    return markdown


def test_sweep_over_slerp_t_ranks_jobs_and_computes_shared_work_once(tmp_path, cache_dir, demo_subset):
    sweep_dir = tmp_path / "sweep"
    summary, result = sweep_cli(sweep_dir, cache_dir, demo_subset, "-m", "+merge=slerp", "merge.parameters.t=0.3,0.7")
    markdown = check_summary_files(sweep_dir, summary)
    runs = summary["runs"]
    assert sorted(r["label"] for r in runs) == ["merge.parameters.t=0.3", "merge.parameters.t=0.7"]
    assert summary["objective"] == {
        "metric": "annealed.preference_accuracy",
        "direction": "maximize",
        "tie_break": None,
    }
    # ranked by the annealed model's held-out preference accuracy, best first; merged vs annealed alongside
    assert [r["rank"] for r in runs] == [1, 2] and runs[0]["objective"] >= runs[1]["objective"]
    for run in runs:
        assert run["objective"] == run["metrics"]["annealed"]["preference_accuracy"]
        assert {"merged", "annealed", "parent:add", "parent:reverse"} <= set(run["metrics"])
        assert {"delta", "ci95"} <= set(run["annealed_vs_merged"]["preference_accuracy"])
        assert "+merge=slerp" in run["overrides"] and Path(run["run_dir"]).parent == sweep_dir.resolve()
    assert summary["best"] == runs[0]["job"]
    # the reference (slerp's base, the unmerged `add` parent) is scored once for the sweep; two distinct merges
    assert summary["cache"] == {"merge": {"miss": 2}, "reference_logps": {"miss": 1, "hit": 1}}
    by_job = {r["job"]: manifest.load(r["run_dir"])["stages"] for r in runs}
    assert [by_job[j]["anneal"]["cache"]["reference_logps"] for j in (0, 1)] == ["miss", "hit"]
    # each job against the best, item by item
    (pair,) = summary["comparisons"]["pairs"]
    assert pair["a"] == summary["best"] and pair["comparable"]
    for metric in ("preference_accuracy", "perplexity", "benchmarks.demo_add", "benchmarks.demo_reverse"):
        value = pair["metrics"][metric]
        assert value["ci95"][0] <= value["delta"] <= value["ci95"][1]
        assert value["differs"] == (value["ci95"][0] > 0 or value["ci95"][1] < 0)
    assert "| rank | job |" in markdown and "reference log-probs: computed 1, reused 1" in markdown
    assert "merge-anneal: sweep done: 2 of 2 jobs finished" in result.stdout


def test_failed_job_is_listed_and_the_sweep_goes_on(tmp_path, shared_cache, tiny):
    """A job that fails (here: slerp takes t from 0 to 1) is listed as failed; the other job still runs."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "+merge=slerp",
        "merge.parameters.t=0.3,oops",
        *SHORT,
        "pipeline.stages=[merge]",
        *tiny.models,
        f"pipeline.cache_dir={shared_cache}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 1  # Hydra's exit code for a sweep with a failed job
    summary = json.loads((sweep_dir / sweep.SUMMARY_JSON).read_text())
    status = {r["label"]: (r["status"], r["error"]) for r in summary["runs"]}
    assert status["merge.parameters.t=0.3"] == ("done", None)
    assert status["merge.parameters.t=oops"][0] == "failed" and "merge:" in status["merge.parameters.t=oops"][1]
    assert "Jobs without a result" in (sweep_dir / sweep.SUMMARY_MD).read_text()


def test_ties_are_broken_and_the_summary_names_the_first_recipe():
    metrics = lambda worst, acc: {
        "annealed": {
            "retention": {"worst": worst},
            "preference_accuracy": acc,
            "ci95": {"retention": {"worst": [worst - 0.1, worst]}, "preference_accuracy": [acc - 0.05, acc + 0.01]},
        }
    }
    runs = [
        {
            "job": 0,
            "label": "+anneal_variant=reference_parent0",
            "objective": 0.6,
            "tie_break": 0.99,
            "metrics": metrics(0.6, 0.99),
        },
        {
            "job": 1,
            "label": "+anneal_variant=parents_mean",
            "objective": 0.95,
            "tie_break": 0.96,
            "metrics": metrics(0.95, 0.96),
        },
        {
            "job": 2,
            "label": "+anneal_variant=parents_max",
            "objective": 0.95,
            "tie_break": 0.98,
            "metrics": metrics(0.95, 0.98),
        },
        {"job": 3, "label": "+anneal_variant=sft_only", "objective": None, "tie_break": None, "rank": None},
    ]
    ranked = sweep.rank(runs, "maximize")
    assert [r["job"] for r in ranked] == [2, 1, 0, 3] and [r["rank"] for r in ranked] == [1, 2, 3, None]
    objective = {
        "metric": "annealed.retention.worst",
        "direction": "maximize",
        "tie_break": "annealed.preference_accuracy",
    }
    sentence = sweep.conclusion(ranked, objective)
    assert sentence.startswith("`+anneal_variant=parents_max` came first of 3 ranked jobs by annealed.retention.worst")
    assert "0.950 [0.850, 0.950]" in sentence and "preference accuracy 0.980 [0.930, 0.990]" in sentence


def test_curves_against_the_number_of_pairs(tmp_path, make_cfg, tiny):
    from pipeline import preferences

    cfg = make_cfg("+merge=slerp", *tiny.data, "data.train_pairs=10")
    first, again = (preferences.load_preferences(DataSettings.of(cfg.data, "data"))[0]["train"] for _ in range(2))
    assert len(first) == 10 and first["prompt"] == again["prompt"]  # a seeded sample
    with pytest.raises(UserError, match="data.train_pairs=1000, but the training data has 48 pairs"):
        preferences.load_preferences(
            DataSettings.of(make_cfg("+merge=slerp", *tiny.data, "data.train_pairs=1000").data, "data")
        )

    run = lambda job, n, variant, worst: {
        "job": job,
        "status": "done",
        "overrides": [f"data.train_pairs={n}", f"+anneal_variant={variant}"],
        "metrics": {
            "annealed": {"retention": {"worst": worst}, "ci95": {"retention": {"worst": [worst - 0.1, worst]}}}
        },
    }
    runs = [
        run(0, 500, "dpo_sft", 0.8),
        run(1, 250, "dpo_sft", 0.5),
        run(2, 250, "parents_mean", 0.7),
        {"job": 3, "status": "failed", "overrides": ["data.train_pairs=1000", "+anneal_variant=dpo_sft"]},
    ]
    table = sweep.curves(runs, "data.train_pairs", ["annealed.retention.worst"])
    assert table == {
        "annealed.retention.worst": {
            "+anneal_variant=dpo_sft": [[250.0, 0.5, [0.5 - 0.1, 0.5]], [500.0, 0.8, [0.8 - 0.1, 0.8]]],
            "+anneal_variant=parents_mean": [[250.0, 0.7, [0.7 - 0.1, 0.7]]],
        }
    }
    sweep.plot_curves(table, "data.train_pairs", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def report():
    return eval_report(
        {
            "annealed": {"preference_accuracy": 0.9, "benchmarks": {"demo_add": 0.5}},
            "parent:my.model": {"perplexity": 3.0},
        },
        {"preference_accuracy": {"delta": 0.07, "ci95": [0.01, 0.1]}},
        win_rate={"vs": {"merged": {"win_rate": 0.6, "length_controlled": 0.55}}},
        verdict={"capabilities": "kept", "answers": "better", "ship": True},
    )


@pytest.mark.parametrize(
    "path, value",
    [
        ("annealed.preference_accuracy", 0.9),
        ("annealed.benchmarks.demo_add", 0.5),
        ("parent:my.model.perplexity", 3.0),
        ("comparison.annealed_vs_merged.preference_accuracy.delta", 0.07),
        ("win_rate.vs.merged.length_controlled", 0.55),
        ("verdict.ship", True),
    ],
)
def test_objective_paths(report, path, value):
    assert sweep.objective_value(report, path) == value


@pytest.mark.parametrize("path", ["annealed.benchmarks", "annealed.nope", "merged.preference_accuracy"])
def test_an_objective_that_names_no_number_is_refused(report, path):
    with pytest.raises(UserError, match="pipeline.objective.metric"):
        sweep.objective_value(report, path)


def test_presets_compose(make_cfg):
    """`+sweep=<preset>` alone makes a multirun (hydra.mode in the preset) with the sweep in its params."""
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for preset, key in (
            ("slerp_t", "merge.parameters.t"),
            ("merge_methods", "+merge"),
            ("anneal_ablation", "+anneal_variant"),
            ("search", "merge.parameters.t"),
            ("data_size", "data.train_pairs"),
            ("anchored_losses", "anneal.trainer.loss_type"),
        ):
            cfg = compose("config", overrides=[f"+sweep={preset}"], return_hydra_config=True)
            assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and key in cfg.hydra.sweeper.params, preset
        cfg = compose("config", overrides=["+sweep=search"], return_hydra_config=True)
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
        for launcher in ("submitit_local", "submitit_slurm"):
            cfg = compose("config", overrides=[f"+launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith(launcher.split("_")[1].capitalize() + "Launcher")
    assert make_cfg("+merge=slerp", "+anneal_variant=sft_only").anneal.trainer.loss_type == ["sft"]
    assert make_cfg("+merge=slerp", "+anneal_variant=reference_merged").anneal.reference == "merged"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # the ablation's recipes
        preset = compose("config", overrides=["+sweep=anneal_ablation"], return_hydra_config=True)
    assert preset.pipeline.objective.metric == "annealed.retention.worst"
    assert preset.pipeline.objective.tie_break == "annealed.preference_accuracy"
    variants = preset.hydra.sweeper.params["+anneal_variant"].split(",")
    assert len(variants) == 14 and {p.stem for p in (CONF_DIR / "anneal_variant").glob("*.yaml")} == set(variants)
    for how in ("mean", "max", "route"):
        plain, with_sft = (
            make_cfg("+merge=slerp", f"+anneal_variant=parents_{how}{sft}").anneal for sft in ("", "_sft")
        )
        assert plain.reference == with_sft.reference == "parents" and plain.reference_combine == how
        assert plain.trainer.loss_type == ["sigmoid"] and with_sft.trainer.loss_type == ["sigmoid", "sft"]
    assert make_cfg("+merge=slerp", "+anneal_variant=dpo_sft").anneal.trainer.loss_weights == [1.0, 1.0]
    assert make_cfg("+merge=slerp").anneal.trainer.loss_type == ["sigmoid", "sft"]  # the default recipe: DPO + SFT
    for variant in ("reference_parent0", "reference_parent1", "reference_merged"):  # the preference loss alone
        assert make_cfg("+merge=slerp", f"+anneal_variant={variant}").anneal.trainer.loss_type == ["sigmoid"]
    for variant, method in (("simpo", "cpo"), ("cpo", "cpo"), ("orpo", "orpo")):  # TRL's reference-free trainers
        assert make_cfg("+merge=slerp", f"+anneal_variant={variant}").anneal.method == method


def test_optuna_search_returns_the_objective(tmp_path, shared_cache, demo_subset):
    sweep_dir = tmp_path / "search"
    summary, _ = sweep_cli(sweep_dir, shared_cache, demo_subset, "+sweep=search", "hydra.sweeper.n_trials=2")
    check_summary_files(sweep_dir, summary)
    assert len(summary["runs"]) == 2
    assert all(any(o.startswith("merge.parameters.t=") for o in r["overrides"]) for r in summary["runs"])
    # Optuna saw each trial's return value: its best is the summary's best
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(summary["runs"][0]["objective"])
    assert f"merge.parameters.t={best['best_params']['merge.parameters.t']}" in summary["runs"][0]["overrides"]


def test_submitit_local_runs_jobs_as_separate_processes(tmp_path, cache_dir, demo_subset):
    """Two jobs at once in their own processes, on an empty cache: two merges (t differs), and one reference pass,
    the other job waiting on the cache lock and then reading it."""
    sweep_dir = tmp_path / "sweep"
    summary, _ = sweep_cli(
        sweep_dir,
        cache_dir,
        demo_subset,
        "-m",
        "+merge=slerp",
        "merge.parameters.t=0.3,0.7",
        "+launcher=submitit_local",
    )
    check_summary_files(sweep_dir, summary)
    jobs = [manifest.load(r["run_dir"])["job"] for r in summary["runs"]]
    assert len({j["pid"] for j in jobs}) == 2 and all(j["status"] == "done" for j in jobs)
    assert summary["cache"]["merge"] == {"miss": 2}
    assert summary["cache"]["reference_logps"] == {"miss": 1, "hit": 1}  # parallel jobs wait on the cache lock
    assert len([d for d in (sweep_dir / ".submitit").iterdir() if d.name.isdigit()]) == 2  # one per job id


def test_anneal_ablation_compares_every_recipe_on_one_merge(tmp_path, shared_cache, demo_subset):
    """Two of the preset's recipes, one reference-free (its list is checked in test_presets_compose; each job
    costs the fast tier seconds), ranked by preference accuracy: the tiny random parents score 0 on their own
    skills, so there is no retention to rank by (as with any data without per-parent skills)."""
    sweep_dir = tmp_path / "ablation"
    summary, _ = sweep_cli(
        sweep_dir,
        shared_cache,
        demo_subset,
        "+sweep=anneal_ablation",
        "+merge=slerp",
        "merge.parameters.t=0.3",
        "+anneal_variant=parents_mean,orpo",
        "pipeline.objective.metric=annealed.preference_accuracy",
    )
    markdown = check_summary_files(sweep_dir, summary)
    runs = {r["label"]: r for r in summary["runs"]}
    assert set(runs) == {f"+anneal_variant={v}" for v in ("parents_mean", "orpo")}
    anneal = {label.split("=")[1]: (r["anneal"]["reference"], r["anneal"]["method"]) for label, r in runs.items()}
    assert anneal == {"parents_mean": ("parents:mean", "dpo"), "orpo": ("base_model", "orpo")}
    # one merge for the whole ablation; slerp's base (`add`) is scored once and shared with the other job (ORPO's
    # loss does not read it; eval does)
    assert summary["cache"]["merge"].get("miss", 0) <= 1 and summary["cache"]["merge"]["hit"] >= 1
    assert summary["cache"]["reference_logps"]["hit"] >= 1
    assert summary["objective"]["tie_break"] == "annealed.preference_accuracy"
    best = next(r for r in summary["runs"] if r["rank"] == 1)
    assert summary["conclusion"].startswith(f"`{best['label']}` came first of 2 ranked jobs")
    assert f"**Conclusion.** {summary['conclusion']}" in markdown
    pairs = summary["comparisons"]["pairs"]
    assert summary["comparisons"]["mode"] == "all" and len(pairs) == 1 and all(p["comparable"] for p in pairs)
    for pair in pairs:
        value = pair["metrics"]["preference_accuracy"]
        assert value["differs"] == (value["ci95"][0] > 0 or value["ci95"][1] < 0)
    assert "## Jobs compared" in markdown and ("**differ**" in markdown or "no pair differs" in markdown)


def test_a_failed_job_frees_its_models(make_cfg, tmp_path, demo_subset):
    """The basic launcher runs every job in one process: a failed job's traceback would keep the models in its
    stage's frames alive into the next job; the task function clears them."""
    import gc

    from transformers import PreTrainedModel

    from pipeline.app import free_job_memory, run_pipeline

    cfg = make_cfg("+merge=slerp", *SHORT, *demo_subset, "anneal=lora", "anneal.peft.target_modules=[no_such_layer]")
    with pytest.raises(ValueError, match="no_such_layer") as caught:
        run_pipeline(cfg, tmp_path)
    alive = lambda: [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    gc.collect()
    assert alive(), "expected the traceback to hold the merged model"
    free_job_memory(caught.value)
    assert not alive()
