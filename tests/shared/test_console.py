"""The console of a run: one training bar, no raw TRL dicts or instant library bars, a closing block naming
where everything landed; the log file keeps one line per training log."""

import re
from pathlib import Path

from conftest import ONE_THREAD, base_overrides, run_cli


def test_a_run_is_quiet_and_ends_with_where_things_are(tiny, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "+merge=slerp",
        *tiny.overrides,
        "eval/benchmarks=none",
        "anneal.trainer.disable_tqdm=false",  # the bar the user sees (the tests' SHORT hides it)
        *base_overrides(cache_dir),
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "anneal: training" in result.stderr and "step/s" in result.stderr  # the one training bar
    assert "{'loss'" not in console and "'rewards/accuracies'" not in console  # no printed TRL log dicts
    for instant in ("Loading weights", "Map", "Filter", "Writing model shards", "Tokenizing"):
        assert instant not in console, instant  # libraries' instant steps stay out (pipeline.verbose shows them)
    block = result.stdout[result.stdout.index("merge-anneal: done") :].splitlines()[1:]
    rows = dict(line.split(None, 1) for line in block if line.strip())
    assert "verdict" in rows and "Not ready to ship" in " ".join(result.stdout.split())  # nothing measured here
    paths = {name: where for name, where in rows.items() if name != "verdict"}
    assert list(paths) == ["merged", "annealed", "released", "report", "manifest"]
    for where in paths.values():
        assert (tmp_path / where).exists(), where  # relative to where the command ran
    assert Path(tmp_path / paths["annealed"]).resolve() == (run_dir / "anneal" / "model").resolve()
    log = (run_dir / "merge-anneal.log").read_text()
    assert re.search(r"anneal: step 2/4: loss [0-9.e-]+, rewards/accuracies", log), log[-2000:]
    assert "{'loss'" not in log


def test_instant_library_bars_are_off_unless_verbose():
    from tqdm.auto import tqdm

    from pipeline import logs

    try:
        logs.quiet_progress_bars(True)
        assert tqdm(range(3), desc="Loading weights").disable
        assert tqdm(desc="Map").disable and tqdm().disable
        assert not tqdm(range(3), desc="anneal: training").disable  # long work keeps its bar
        assert not tqdm(range(3), desc="Running loglikelihood requests").disable
        logs.quiet_progress_bars(False)  # pipeline.verbose=true
        assert not tqdm(range(3), desc="Loading weights").disable
    finally:
        logs.quiet_progress_bars(False)
