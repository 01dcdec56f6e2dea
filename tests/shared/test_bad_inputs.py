"""Every user mistake ends the same way, before any work: one paragraph on stderr naming the problem and the fix,
exit code 2, no traceback, no run folder written. Each case runs `python -m pipeline` (in this process, with the
network refused) on the tiny models with your-own-data settings; its exit code, message and seconds go to
`bad-inputs.jsonl` in pytest's session folder (`python tests/shared/bad_inputs_table.py <that file>` tabulates
them). Timings are recorded, never asserted."""

import json
import time

import pytest

from conftest import SHORT, run_in_process, session_root, write_jsonl

# (case, overrides, phrases the message must hold); `{data}` is a folder of bad data files the fixture writes
CASES = [
    ("no merge chosen", [], ["+merge=<option>", "slerp"]),
    ("misspelt merge method", ["+merge=slerpp"], ["merge=slerp", "Did you mean"]),
    ("misspelt group option", ["+merge=slerp", "anneal=lorra"], ["anneal=lora", "Options: dpo, lora, qlora"]),
    ("misspelt trainer key", ["+merge=slerp", "anneal.trainer.learning_rat=1e-5"], ["anneal.trainer.learning_rate"]),
    (
        "a DPOConfig field conf/ leaves out",
        ["+merge=slerp", "anneal.trainer.ld_alpha=0.5"],
        ["+anneal.trainer.ld_alpha"],
    ),
    ("unknown top-level key", ["+merge=slerp", "foo=1"], ["no setting 'foo'"]),
    ("misspelt merge parameter", ["+merge=slerp", "merge.parameters.tt=0.3"], ["merge.parameters.t"]),
    ("unreadable override", ["+merge=slerp", "anneal.trainer.learning_rate=[1"], ["cannot be read", "key=value"]),
    ("negative learning rate", ["+merge=slerp", "anneal.trainer.learning_rate=-1e-5"], ["must be positive"]),
    ("misspelt release pick", ["+merge=slerp", "release.pick=bestt"], ["release.pick", "'best'"]),
    ("unknown anneal method", ["+merge=slerp", "anneal.method=dpoo"], ["anneal.method"]),
    ("unknown stage", ["+merge=slerp", "pipeline.stages=[merj]"], ["Unknown stage", "merj"]),
    ("missing data file", ["+merge=slerp", "data.path=nope.jsonl"], ["nope.jsonl", "neither a file"]),
    ("unsupported data file", ["+merge=slerp", "data.path={data}/pairs.txt"], ["unsupported file type"]),
    ("a broken jsonl line", ["+merge=slerp", "data.path={data}/broken.jsonl"], ["line 2", "not a JSON object"]),
    (
        "prompt under another name",
        ["+merge=slerp", "data.path={data}/question.jsonl"],
        ["data.columns.prompt=question"],
    ),
    ("implicit prompts that come out empty", ["+merge=slerp", "data.path={data}/no_prompt.jsonl"], ["empty prompt"]),
    ("a column map naming no column", ["+merge=slerp", "data.columns.chosen=good"], ["lacks column(s)", "good"]),
    ("no held-out pairs", ["+merge=slerp", "data.heldout.path=null", "data.heldout.fraction=null"], ["held-out"]),
    ("missing merge YAML", ["+merge=custom", "merge.config_file=missing.yml"], ["missing.yml", "does not exist"]),
    ("unknown benchmark task", ["+merge=slerp", "eval.benchmarks.tasks=[no_such_task]"], ["no_such_task"]),
    ("built-in benchmarks offline", ["+merge=slerp", "eval/benchmarks=general"], ["eval/benchmarks=none"]),
    ("a reward function that is not there", ["+merge=slerp", "eval.win_rate.reward=nowhere:fn"], ["module:function"]),
    (
        "verdict threshold out of range",
        ["+merge=slerp", "eval.verdict.retention_threshold=-1"],
        ["retention_threshold"],
    ),
    ("release to the hub without a token", ["+merge=slerp", "release=hub", "release.repo_id=me/x"], ["HF_TOKEN"]),
]


def by_key(overrides: list[str]) -> dict[str, str]:
    """Overrides by the key or group they set (a later one replaces an earlier one)."""
    return {o.split("=")[0].lstrip("+~"): o for o in overrides}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("bad-data")
    (folder / "pairs.txt").write_text("12+34= 46 47\n")
    (folder / "broken.jsonl").write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n[1, 2]\n')
    write_jsonl(
        folder / "question.jsonl", [{"question": f"{i}+1=", "chosen": f"{i + 1}", "rejected": "0"} for i in range(9)]
    )
    write_jsonl(folder / "no_prompt.jsonl", [{"chosen": f"ab{i}", "rejected": f"cd{i}"} for i in range(9)])
    return folder


@pytest.mark.parametrize("case, overrides, phrases", CASES, ids=[c[0] for c in CASES])
def test_a_user_mistake_is_one_paragraph_exit_2_before_any_work(
    case, overrides, phrases, bad_data, tiny, tmp_path, no_network, monkeypatch, tmp_path_factory
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run_dir = tmp_path / "run"
    base = [*tiny.models, *tiny.data[:3], "eval/benchmarks=none", *SHORT]  # your own models and data
    base += [f"pipeline.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    args = by_key(base) | by_key([o.format(data=bad_data) for o in overrides])
    started = time.perf_counter()
    result = run_in_process(*args.values(), cwd=tmp_path)
    seconds = time.perf_counter() - started
    message = " ".join(result.stderr.split())
    with open(session_root(tmp_path_factory) / "bad-inputs.jsonl", "a") as log:
        log.write(
            json.dumps({"case": case, "exit": result.returncode, "seconds": round(seconds, 2), "message": message})
            + "\n"
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message.startswith("merge-anneal: error:") and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "\n\n" not in result.stderr.strip()  # one paragraph
    assert all(p in message for p in phrases), message
    assert not (run_dir / "manifest.json").exists() and not (tmp_path / "cache" / "merges").exists()


def test_several_launched_processes_are_refused_naming_distributed(tiny, tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2 -m pipeline ...`: rank 0 says to start once with distributed=ddp, the other
    ranks leave quietly; no run folder."""
    for rank, expected in (("0", "distributed=ddp distributed.num_processes=2"), ("1", "")):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        result = run_in_process("+merge=slerp", *tiny.models, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 2
        assert expected in " ".join(result.stderr.split()) and (rank == "0") == bool(result.stderr.strip())
    assert not (tmp_path / "run").exists()


def test_version_is_merge_anneals(tmp_path):
    from importlib.metadata import version

    result = run_in_process("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"merge-anneal {version('merge-anneal')}"
