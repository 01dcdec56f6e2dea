"""Shared fixtures: the embedded demo (built once per session), Hydra composition, CLI subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline import CONF_DIR, demo

REPO = Path(__file__).resolve().parents[1]
# The demo parents are inputs, shared by every test and kept across local runs (built fresh in CI).
TEST_CACHE = Path(os.environ.get("MERGE_ANNEAL_TEST_CACHE", REPO / "outputs" / ".test-cache")).resolve()


@pytest.fixture(scope="session")
def demo_path() -> Path:
    return demo.ensure_demo(TEST_CACHE)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    """A fresh result cache (merges) per test; the demo parents stay in TEST_CACHE."""
    return tmp_path / "cache"


def base_overrides(cache_dir: Path) -> list[str]:
    return [f"pipeline.cache_dir={cache_dir}", f"models.cache_dir={TEST_CACHE}"]


@pytest.fixture
def make_cfg(cache_dir):
    """compose() the real config with overrides, as `python -m pipeline` would."""
    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[*base_overrides(cache_dir), *overrides])
    return _compose


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=1800)


@pytest.fixture
def cli(tmp_path, cache_dir, demo_path):
    """Run the pipeline CLI in tmp_path with the test caches; returns (CompletedProcess, run_dir)."""
    def _run(*args: str, run_dir: Path | None = None, env: dict | None = None):
        run_dir = run_dir or tmp_path / "run"
        result = run_cli(*args, *base_overrides(cache_dir), f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
        return result, run_dir
    return _run


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory, demo_path):
    """The README's command, `python -m pipeline +merge=slerp`: every stage with the default budget, run once
    for the whole session. Returns (run_dir, work_dir, cache_dir, completed process); tests only read it."""
    work = tmp_path_factory.mktemp("readme-run")
    result = run_cli("+merge=slerp", f"pipeline.cache_dir={work / 'cache'}", f"models.cache_dir={TEST_CACHE}",
                     f"hydra.run.dir={work / 'run'}", cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    return work / "run", work, work / "cache", result
