"""Typed settings: one pydantic model per config block the code reads, field names as in the YAML (conf/). The
blocks two stages read are here (the cache policy, the preference data); each stage's own are in its package
(`stages/<stage>/settings.py`).

Each stage builds the blocks it reads once, at the top of its `run`, and hands each helper only its own block
(torchtune's recipes, mergekit's `run_merge(config, out_path, options)`): no helper receives the whole `cfg`. The
same models run in each stage's `check(cfg)`, which the app calls for every chosen stage before the first one
starts, so a typo in the last stage's settings costs seconds, not the run.

The libraries' own blocks stay theirs: `anneal.trainer` is handed to TRL's `DPOConfig`, `anneal.method_args` to
CPOConfig / ORPOConfig, `anneal.peft` to PEFT's `LoraConfig`, `merge` to mergekit's `MergeConfiguration`,
`merge_options` to `MergeOptions`; here they are dicts, and the stages' checks build those types from them.
"""

from pathlib import Path
from typing import Literal, Self

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from pipeline import UserError


class Settings(BaseModel):
    """A config block, read once (`of`); unknown keys are refused, and nothing changes it afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, node: DictConfig | dict, where: str) -> Self:
        """The block at config key `where` (e.g. `release`), validated; a mistake is a UserError naming the key."""
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise UserError(explain(err, where)) from None


def explain(err: ValidationError, where: str) -> str:
    """A pydantic error as one sentence per problem: the full key, what it got, what it takes."""
    problems = []
    for error in err.errors():
        key = ".".join([where, *(str(part) for part in error["loc"])])
        got = f" (got {error['input']!r})" if error["type"] != "missing" and "input" in error else ""
        problems.append(f"{key}: {error['msg']}{got}")
    return (
        f"Invalid setting{'s' if len(problems) > 1 else ''}: {'; '.join(problems)}. Fix: correct "
        f"{'them' if len(problems) > 1 else 'it'} on the command line or in conf/ (each group's YAML file "
        "documents its keys)."
    )


# -------------------------------------------------------------------------------------------------- pipeline


class CachePolicy(Settings):
    """How results computed once are kept and reused (`pipeline.cache*`)."""

    cache: bool
    cache_dir: Path
    cache_files: Literal["auto", "clone", "hardlink"]
    cache_verify: Literal["cheap", "all"]

    @classmethod
    def of_pipeline(cls, pipeline: DictConfig) -> Self:
        fields = {name: pipeline[name] for name in cls.model_fields}
        policy = cls.of(fields, "pipeline")
        return policy.model_copy(update={"cache_dir": policy.cache_dir.expanduser()})


# ------------------------------------------------------------------------------------------------------ data


class Heldout(Settings):
    path: str | None = None
    split: str | None = None
    fraction: float | None = Field(default=None, gt=0, lt=1)


class Columns(Settings):
    prompt: str
    chosen: str
    rejected: str
    system: str | None = None


class DataSettings(Settings):
    """`data`: the preference pairs (conf/data/)."""

    source: Literal["demo", "custom"]
    path: str
    name: str | None = None  # a hub data set's configuration name (load_dataset's `name`)
    split: str = "train"
    heldout: Heldout
    columns: Columns
    seed: int = 0
    train_pairs: PositiveInt | None = None
    heldout_text: str | None = None
    with_other_models: bool = False
