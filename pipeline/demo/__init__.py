"""The embedded demo: three tiny character-level Llama models plus preference data, built on first use.

Two parts: ``tasks`` (the two tasks: prompts, exact answers, wrong answers; pure) and ``build`` (the
training recipe and the build, which alone key the cache). This module only finds and publishes builds:
``demo_dir`` (where the current recipe's build lives) and ``ensure_demo`` (build it once, under a file
lock). Importing it is instant: torch and transformers are imported inside the build's functions.

Run: ``python -m pipeline.demo [cache_dir]``.
"""

import pathlib
import shutil
import sys

from pipeline.demo import build
from pipeline.demo.build import RECIPE, recipe_hash
from pipeline.demo.tasks import SKILLS

__all__ = ["RECIPE", "SKILLS", "demo_dir", "ensure_demo", "recipe_hash"]


def demo_dir(cache_dir) -> pathlib.Path:
    """Where the demo for the current recipe lives (or would live). Builds nothing."""
    return pathlib.Path(cache_dir).expanduser().resolve() / "demo" / recipe_hash()


def ensure_demo(cache_dir) -> pathlib.Path:
    """Build the demo if it is missing; return demo_dir(cache_dir). Never rebuilds one that exists."""
    final = demo_dir(cache_dir)
    if final.is_dir():
        return final
    from filelock import FileLock

    from pipeline.artifacts import publish

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if final.is_dir():  # someone else built it while we waited
            return final
        # Under the lock no other builder of this hash runs: leftovers of killed builds are stale.
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        print(f"building demo models into {final} (one-off, about 2.5 min on 2 CPU cores)", file=sys.stderr, flush=True)

        def fill(tmp: pathlib.Path) -> None:
            tmp.mkdir()
            build.build_into(tmp)

        publish(final, fill)
    return final
