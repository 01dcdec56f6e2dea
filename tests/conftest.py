"""Shared fixtures, in two tiers.

- Fast tier: `tiny`, random 2-layer Llamas built in milliseconds (as mergekit's tests build theirs) with the
  demo's character tokenizer, and a few dozen preference pairs: plumbing, errors and config.
- Demo tier (`slow`): the embedded demo's trained parents (built once where the README's first command builds
  them, ~3.5-6 minutes on 2 CPU cores) for claims that need trained parents, and the README's own command, run
  once per session (`run_once`: xdist workers share it).
"""

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline import CONF_DIR, demo

REPO = Path(__file__).resolve().parents[1]
# The demo parents are an input, content-addressed by their recipe: the tests use the demo where the README's
# first command (`python -m pipeline +merge=slerp`) builds it, the user's merge-anneal cache, and build it there
# once when it is missing. MERGE_ANNEAL_TEST_CACHE points the tests elsewhere.
TEST_CACHE = (
    Path(os.environ.get("MERGE_ANNEAL_TEST_CACHE") or os.environ.get("MERGE_ANNEAL_CACHE") or "~/.cache/merge-anneal")
    .expanduser()
    .resolve()
)
# Fast-tier subprocesses run one torch thread: tiny models gain nothing from two, and two xdist workers share
# the 2 cores (two spinning threads per process made runs up to 20x slower).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# A short anneal: the tests check plumbing, not the annealing effect.
SHORT = [
    "anneal.trainer.max_steps=4",
    "anneal.trainer.logging_steps=2",
    "anneal.trainer.save_steps=1000",
    "anneal.trainer.disable_tqdm=true",
]


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on the machine's cores: one torch thread each
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests that use the trained demo must be in the demo tier (`slow`); `gpu` tests are skipped without CUDA; the
    fault-injection suite (`faults`) runs only when a -m expression names it."""
    if "faults" not in (config.option.markexpr or ""):
        faults = [item for item in items if item.get_closest_marker("faults")]
        if faults:
            config.hook.pytest_deselected(items=faults)
            items[:] = [item for item in items if not item.get_closest_marker("faults")]
    untiered = [
        item.nodeid
        for item in items
        if not item.get_closest_marker("slow") and {"demo_path", "readme_run"} & set(getattr(item, "fixturenames", ()))
    ]
    if untiered:
        raise pytest.UsageError(f"tests using the trained demo must be marked slow: {untiered}")
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


# ------------------------------------------------------------------------------------------------ fast tier


@dataclass
class Tiny:
    """Random tiny parents (`base`, `add`, `reverse`: the demo's names) and preference data on disk, with the
    overrides that choose them: `models` (the parents), `data` (the pairs), `overrides` (both, a short anneal)."""

    root: Path
    models: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Path:
        return self.root / name

    @property
    def overrides(self) -> list[str]:
        # the pairs are a few dozen characters: a length limit to match (the reference pass batches by tokens)
        return [
            *self.models,
            *self.data,
            "anneal.trainer.per_device_train_batch_size=4",
            "anneal.trainer.max_length=64",
            *SHORT,
        ]


def llama_settings(tokenizer, **overrides) -> dict:
    """LlamaConfig fields of the tests' tiny Llamas (2 layers, hidden 16, the tokenizer's vocabulary and special
    tokens), with `overrides`."""
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return {**settings, **overrides}


def make_tiny_llama(folder: Path, seed: int, base: Path | None = None, noise: float = 0.05, **config) -> Path:
    """A 2-layer Llama (hidden 16) with the demo's character tokenizer, random (or `base` plus seeded noise),
    saved as safetensors; `config` overrides LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo.build import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    architecture = config.pop("architecture", None)
    model = LlamaForCausalLM(LlamaConfig(**llama_settings(tokenizer, **config)))
    if base is not None:
        model.load_state_dict(LlamaForCausalLM.from_pretrained(base).state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape) * noise)
    if architecture:
        model.config.architectures = [architecture]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_pairs(n: int, seed: int) -> list[dict]:
    """Demo-style preference pairs (addition and reversal, a wrong answer rejected)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt, answer = f"{a}+{b}=", str(a + b)
            wrong = str(a + b + rng.choice((-1, 1)))
        else:
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
            prompt, answer = f"rev {word}=", word[::-1]
            wrong = answer + answer[-1]
        rows.append({"prompt": prompt, "chosen": answer, "rejected": wrong, "skill": "add" if i % 2 else "reverse"})
    return rows


def eval_report(models: dict[str, dict], comparison: dict | None = None, **sections):
    """A small `records.EvalReport` for tests of what reads one: each model's metrics (the scalars not given take
    plain values), annealed minus merged as given, and any other section of the report (win_rate, verdict, ...)."""
    from pipeline import records

    base = {
        "preference_accuracy": 0.5,
        "preference_accuracy_normalized": 0.5,
        "kl_to_reference": 0.0,
        "perplexity": 2.0,
        "perplexity_heldout_chosen": 2.0,
        "ci95": {},
    }
    return records.EvalReport(
        models={name: records.ModelMetrics(**{**base, **values}) for name, values in models.items()},
        comparison={"annealed_vs_merged": comparison or {}},
        heldout_pairs=8,
        reference={},
        perplexity_on="heldout chosen completions",
        beta=0.1,
        bootstrap={},
        generation={},
        scoring_seconds=0.0,
        **sections,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def session_root(tmp_path_factory) -> Path:
    """This test session's temporary folder that every xdist worker shares."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """Built once per session (xdist workers share it, under a file lock)."""
    from filelock import FileLock

    root = session_root(tmp_path_factory) / "tiny"
    with FileLock(str(root) + ".lock"):
        if not (root / "data" / "heldout.jsonl").is_file():
            base = make_tiny_llama(root / "base", seed=0)
            make_tiny_llama(root / "add", seed=1, base=base)
            make_tiny_llama(root / "reverse", seed=2, base=base)
            (root / "data").mkdir()
            write_jsonl(root / "data" / "train.jsonl", tiny_pairs(48, seed=0))
            write_jsonl(root / "data" / "heldout.jsonl", tiny_pairs(16, seed=1))
    data = root / "data"
    return Tiny(
        root,
        models=["models=local", f"models.base={root / 'base'}", f"models.parents=[{root / 'add'},{root / 'reverse'}]"],
        data=[
            "data=custom",
            f"data.path={data / 'train.jsonl'}",
            f"data.heldout.path={data / 'heldout.jsonl'}",
            # demo-style pairs: the demo's tasks and rule, and eval's settings, as the demo's recipe sets them
            "eval/benchmarks=demo",
            "eval.win_rate.reward=pipeline.demo.reward:reward",
            "eval.max_new_tokens=8",
            "eval.batch_size=64",
        ],
    )


# ------------------------------------------------------------------------------------------------ demo tier


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The trained demo, built as a user's first run builds it: in its own process, torch's default threads."""
    if not demo.demo_dir(TEST_CACHE).is_dir():
        subprocess.run(
            [sys.executable, "-m", "pipeline.demo", str(TEST_CACHE)],
            check=True,
            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
        )
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


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One result cache per test module (a module may bring its own): merges and reference log-probs computed once."""
    return tmp_path_factory.mktemp("anneal-cache")


@pytest.fixture
def make_short_cfg(shared_cache, tiny):
    """The tiny parents and (unless `data=custom` is among the overrides) their data, a 4-step anneal, merge and
    anneal only."""

    def _compose(*overrides):
        own_data = "data=custom" in overrides
        chosen = [o for o in tiny.overrides if not (own_data and o in tiny.data)]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    f"pipeline.cache_dir={shared_cache}",
                    f"models.cache_dir={TEST_CACHE}",
                    "pipeline.stages=[merge,anneal]",
                    *chosen,
                    *overrides,
                ],
            )

    return _compose


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to reach a host; the test asserts there were none. TRL's trainers send the
    hub usage telemetry unless told not to (HF_HUB_DISABLE_TELEMETRY=1, or CI set): a user's choice, switched off
    here, so what is checked is what the pipeline itself asks of the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled in this test")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=1800,
    )


# Loaded at start-up by a `python -m pipeline` child whose PYTHONPATH names its folder: the child stops itself
# (SIGSTOP) right after it writes its first complete checkpoint (the Trainer writes trainer_state.json last), so a
# test can act while that run is alive mid-training, however fast or slow the machine.
STOP_AT_FIRST_CHECKPOINT = """
import os, signal
from transformers.trainer_callback import TrainerState

_save = TrainerState.save_to_json

def _save_then_stop(self, json_path):
    _save(self, json_path)
    TrainerState.save_to_json = _save
    os.kill(os.getpid(), signal.SIGSTOP)

TrainerState.save_to_json = _save_then_stop
"""


def stop_at_first_checkpoint(folder: Path) -> dict:
    """The environment that makes a `python -m pipeline` child stop itself after its first checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(STOP_AT_FIRST_CHECKPOINT)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def wait_until_stopped(process: subprocess.Popen) -> None:
    """Block until `process` is stopped by a signal (state T in /proc); fails if it exits first."""
    import time

    while process.poll() is None:
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run exited (code {process.returncode}) before it stopped at its first checkpoint")


def run_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` through the same entry point (Hydra's main, the app's error handling and exit
    codes), in this process: no interpreter start and imports (8-10 s a call). For runs that set no environment
    variables (the libraries read theirs when imported)."""
    import contextlib
    import io

    from pipeline.cli import main

    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv, Path.cwd()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = ["pipeline", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["pipeline", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(tmp_path, cache_dir):
    """Run the pipeline CLI in tmp_path with the test caches; returns (CompletedProcess, run_dir). In this process
    (`run_in_process`) unless `env` is given or `process=True`: then a real subprocess (one torch thread)."""

    def _run(*args: str, run_dir: Path | None = None, env: dict | None = None, process: bool = False):
        run_dir = run_dir or tmp_path / "run"
        args = (*args, *base_overrides(cache_dir), f"hydra.run.dir={run_dir}")
        if env is None and not process:
            return run_in_process(*args, cwd=tmp_path), run_dir
        return run_cli(*args, cwd=tmp_path, env={**ONE_THREAD, **(env or {})}), run_dir

    return _run


def run_once(tmp_path_factory, name: str, *args: str, env: dict | None = None):
    """`python -m pipeline ARGS` run once for the whole test session, xdist workers included (under a file lock in
    the session's shared temporary folder; the others wait and reuse it). Returns (work_dir, completed process):
    the run folder is `work_dir / "run"`, its result cache `work_dir / "cache"`."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    work, record = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not record.is_file():
            work.mkdir()
            result = run_cli(
                *args,
                f"pipeline.cache_dir={work / 'cache'}",
                f"models.cache_dir={TEST_CACHE}",
                f"hydra.run.dir={work / 'run'}",
                cwd=work,
                env=env,
            )
            record.write_text(
                json.dumps({"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr})
            )
    saved = json.loads(record.read_text())
    result = subprocess.CompletedProcess(list(args), saved["returncode"], saved["stdout"], saved["stderr"])
    assert result.returncode == 0, result.stderr[-4000:]
    return work, result


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory, demo_path):
    """The README's command, `python -m pipeline +merge=slerp`: every stage with the default budget, run once
    for the whole session. Returns (run_dir, work_dir, cache_dir, completed process); tests only read it."""
    work, result = run_once(tmp_path_factory, "readme-run", "+merge=slerp")
    return work / "run", work, work / "cache", result
