"""`python -m pipeline`: what the command line needs before the Hydra app runs.

- `--version` prints merge-anneal's version (Hydra's flag would print Hydra's).
- Launched by `torchrun` or `accelerate launch` on several processes, every process would run the whole pipeline
  in one run folder: refused at once, naming the `distributed=` setting that spreads the anneal instead.
- The command line's overrides are composed once before the app starts, so Hydra's own errors (an unknown group
  option or key, a syntax error) end like every user mistake: one paragraph naming the nearest valid names, exit
  code 2, nothing written. Hydra's advice to add `+` is given only where the key is a real field of the library's
  config that the YAML leaves out.
"""

import difflib
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version

from pipeline import CONF_DIR, UserError

# Config blocks that take any field of a library's config, beside the ones the YAML lists.
LIBRARY_FIELDS = {"anneal.trainer": "trl:DPOConfig", "merge_options": "mergekit.merge:MergeOptions"}
NO_PREFLIGHT = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")


def merge_anneal_version() -> str:
    try:
        return version("merge-anneal")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


def check_launcher(environ=os.environ) -> None:
    """Several processes started by torchrun / accelerate launch each running the whole pipeline: refused."""
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if int(environ.get("RANK", "0") or 0) != 0:
            sys.exit(2)  # rank 0 says why
        raise UserError(
            f"merge-anneal was started on {world} processes (torchrun or accelerate launch): each would run the "
            "whole pipeline in the same run folder. Fix: start it once, `python -m pipeline ...`, and spread the "
            f"anneal over the processes with distributed=ddp distributed.num_processes={world} (or "
            "distributed=fsdp2 / zero3); the pipeline launches them itself."
        )


def preflight(argv: list[str]) -> None:
    """Compose the config the command line asks for (each sweep's values in turn); Hydra's errors as UserError."""
    if any(arg in NO_PREFLIGHT or arg.startswith(("--cfg=", "--config-")) for arg in argv):
        return
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = get_args_parser().parse_known_args(argv)[0].overrides
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UserError(
            f"The command line cannot be read: {' '.join(str(err).split())}. Fix: write each setting as "
            "key=value (quote values with spaces or brackets, e.g. 'models.parents=[/a,/b]')."
        ) from None
    for candidate in candidates(parsed):
        compose_or_explain(candidate)


def candidates(parsed) -> list[list[str]]:
    """Override lists to compose: the sweep overrides at their first value, then each other value in turn."""
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [(o, [str(v) for v in getattr(o.value(), "list", [])]) for o in parsed if o.is_sweep_override()]
    first = [f"{prefix(o)}{o.key_or_group}={values[0]}" for o, values in sweeps if values]
    out = [fixed + first]
    for i, (o, values) in enumerate(sweeps):
        for value in values[1:]:
            out.append(fixed + first[:i] + [f"{prefix(o)}{o.key_or_group}={value}"] + first[i + 1 :])
    return out


def prefix(override) -> str:
    return "+" if override.is_add() else "++" if override.is_force_add() else "~" if override.is_delete() else ""


def compose_or_explain(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            compose("config", overrides=overrides, return_hydra_config=True)
        except MissingConfigException as err:
            raise UserError(unknown_option(err)) from None
        except HydraException as err:
            key = re.search(r"Could not override '([^']+)'", str(err))
            if not key:
                raise UserError(f"{' '.join(str(err).split())}. Fix: correct that setting.") from None
            base = [o for o in overrides if not o.lstrip("+~").startswith(f"{key.group(1)}=")]
            raise UserError(unknown_key(key.group(1), compose("config", overrides=base))) from None


def unknown_option(err) -> str:
    missing = getattr(err, "missing_cfg_file", "") or ""
    group, _, name = missing.rpartition("/")
    options = list(getattr(err, "options", None) or [])
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return (
        f"{group}={name}: there is no option '{name}' in the config group '{group}'."
        + (f" Did you mean {' or '.join(f'{group}={n}' for n in near)}?" if near else "")
        + f" Options: {', '.join(options)}."
        + (" (Methods come with a +: +merge=<option>.)" if group == "merge" else "")
    )


def unknown_key(key: str, cfg) -> str:
    """An override of a key the config does not have: the nearest keys of its block, or `+` for a library field."""
    parent, _, name = key.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else []:
        node = node.get(part) if hasattr(node, "get") else None
    keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
    fields = library_fields(parent)
    if name in fields:
        return (
            f"{key} is a field of {LIBRARY_FIELDS[parent].split(':')[1]} that conf/ leaves at the library's default. "
            f"Fix: add it with a +, +{key}=<value>."
        )
    near = difflib.get_close_matches(name, sorted({*keys, *fields}), n=3, cutoff=0.6)
    where = f"'{parent}'" if parent else "the config's top level"
    return (
        f"{key}: there is no setting '{name}' in {where}."
        + (f" Did you mean {' or '.join(f'{parent}.{n}' if parent else n for n in near)}?" if near else "")
        + (f" Its settings: {', '.join(keys)}." if keys and len(keys) <= 40 else "")
        + " Fix: correct the name (`python -m pipeline --help` lists the groups; each group's YAML in conf/ documents "
        "its keys)."
    )


def library_fields(block: str) -> list[str]:
    """The fields of the library config a block speaks for (DPOConfig, MergeOptions), or none."""
    spec = LIBRARY_FIELDS.get(block)
    if spec is None:
        return []
    import importlib

    module, _, name = spec.partition(":")
    kind = getattr(importlib.import_module(module), name)
    if hasattr(kind, "model_fields"):
        return list(kind.model_fields)
    return list(getattr(kind, "__dataclass_fields__", {}))


def main() -> None:
    """The command: --version, the launcher and the overrides checked, then the Hydra app (pipeline/app.py)."""
    from pipeline import app

    argv = sys.argv[1:]
    if "--version" in argv:
        print(f"merge-anneal {merge_anneal_version()}")
        return
    try:
        check_launcher()
        preflight(argv)
    except UserError as err:
        app.fail(str(err))
    app.main()
