"""merge-anneal: merge checkpoints with mergekit, anneal the merge with DPO, evaluate, release.

Importing this package is cheap (no torch, mergekit or TRL): heavy libraries are imported inside the
stage functions, so `python -m pipeline --help` and configuration errors answer at once.
"""

from pathlib import Path

from omegaconf import OmegaConf

from pipeline import demo

__all__ = ["UserError", "CONF_DIR"]


class UserError(Exception):
    """A mistake in the user's input: printed as one paragraph, without a traceback, exit code 2."""


def _conf_dir() -> Path:
    """The Hydra config root: `pipeline/conf` in an installed copy, `<repo>/conf` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"merge-anneal's config folder is missing (looked in {here}/conf and {here.parent}/conf)")


CONF_DIR = _conf_dir()

# `${demo_dir:<cache_dir>}`: where the embedded demo parents live (pure: builds nothing).
OmegaConf.register_new_resolver("demo_dir", lambda cache_dir: str(demo.demo_dir(cache_dir)), replace=True)


def demo_benchmarks() -> str:
    """The folder of the demo's lm-evaluation-harness tasks (conf/eval/benchmarks/demo.yaml: `${demo_benchmarks:}`)."""
    return str(Path(demo.__file__).parent / "benchmarks")


OmegaConf.register_new_resolver("demo_benchmarks", demo_benchmarks, replace=True)
