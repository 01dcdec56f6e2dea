"""Preference data for the anneal stage: load, map columns, split off held-out pairs, drop bad rows (counted).

Rows keep TRL's formats (standard strings, conversational message lists, or implicit prompt) and are
handed to TRL unchanged; the reference log-prob store adds `ref_chosen_logps` / `ref_rejected_logps`.
"""

import hashlib
import json
from pathlib import Path

from pipeline import UserError
from pipeline.models import is_hub_id
from pipeline.settings import DataSettings

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COLUMNS = ("prompt", "chosen", "rejected")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the reference pass's log-probs, in TRL's names


def check_sources(data: DataSettings) -> None:
    """Before any stage runs: each file the data names exists (or is a hub data set id) and is of a type that loads.
    The demo's pairs are built with the demo, later."""
    if data.source == "demo":
        return
    for key, ref in (("data.path", data.path), ("data.heldout.path", data.heldout.path)):
        if ref is None:
            continue
        local = Path(ref).expanduser()
        if local.is_file() and local.suffix.lower() not in FILE_BUILDERS:
            raise UserError(
                f"{key}={ref}: unsupported file type '{local.suffix}'. Fix: use a .json, .jsonl, .parquet "
                "or .csv file, or a hub data set id."
            )
        if not local.is_file() and not is_hub_id(str(ref)):
            raise UserError(
                f"{key}={ref} is neither a file nor a hub data set id (org/name). Fix: pass an existing "
                f"json/jsonl/parquet/csv file (absolute, or relative to {Path.cwd()}) or a hub id."
            )
    if not (data.heldout.path or data.heldout.split or data.heldout.fraction):
        raise UserError(NO_HELDOUT)


NO_HELDOUT = (
    "No held-out preference pairs configured. Fix: set data.heldout.path, data.heldout.split or "
    "data.heldout.fraction (e.g. data.heldout.fraction=0.1)."
)


def load_preferences(data: DataSettings, keep: tuple[str, ...] = ()):
    """`DatasetDict(train=..., heldout=...)` in TRL's column names (and the data's own columns `keep`, e.g. the one
    anneal.reference_route reads), and the counts of dropped rows. The held-out pairs never share a prompt with the
    training pairs: a held-out fraction is split by prompt, and a held-out pair whose prompt is also trained on is
    dropped (counted)."""
    from datasets import DatasetDict

    mapped = lambda ds, split: map_columns(ds, data.columns.model_dump(), split, keep)
    train = mapped(_load(data.path, data.split, "data.path", data.name), "train")
    if data.heldout.path:
        heldout = mapped(_load(data.heldout.path, data.heldout.split or "train", "data.heldout.path"), "heldout")
    elif data.heldout.split:
        heldout = mapped(_load(data.path, data.heldout.split, "data.heldout.split", data.name), "heldout")
    elif data.heldout.fraction:
        train, heldout = split_by_prompt(train, float(data.heldout.fraction), data.seed)
    else:
        raise UserError(NO_HELDOUT)
    if data.train_pairs:
        if int(data.train_pairs) > len(train):
            raise UserError(
                f"data.train_pairs={data.train_pairs}, but the training data has {len(train)} pairs. Fix: "
                f"ask for at most {len(train)}, or data.train_pairs=null for all."
            )
        train = train.shuffle(seed=data.seed).select(range(int(data.train_pairs)))
    dropped, splits = {}, {}
    for name, ds in (("train", train), ("heldout", heldout)):
        ds, counts = drop_bad_rows(ds)
        if name == "heldout":
            trained = {prompt_key(p) for p in splits["train"]["prompt"]}
            shared = [i for i, p in enumerate(ds["prompt"]) if prompt_key(p) in trained]
            counts["prompt_in_training"] = len(shared)
            ds = ds.select(sorted(set(range(len(ds))) - set(shared)))
        dropped[name] = counts
        if len(ds) == 0:
            raise UserError(
                f"No {name} preference pairs are left after filtering ({counts}). Fix: check the data "
                "(empty answers, chosen equal to rejected, held-out prompts that are also trained on) and "
                "data.columns."
            )
        splits[name] = ds
    return DatasetDict(splits), dropped


def prompt_key(prompt) -> str:
    """A prompt as one string (a conversation as its JSON)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_by_prompt(ds, fraction: float, seed: int):
    """(train, held-out): a seeded `fraction` of the distinct prompts, with every pair that has one of them, held
    out; the rest trained on."""
    import random

    prompts = list(dict.fromkeys(prompt_key(p) for p in ds["prompt"]))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(fraction * len(prompts)))])
    keys = [prompt_key(p) for p in ds["prompt"]]
    return (
        ds.select([i for i, k in enumerate(keys) if k not in held]),
        ds.select([i for i, k in enumerate(keys) if k in held]),
    )


def _load(path, split: str, key: str, name: str | None = None):
    from datasets import load_dataset

    local = Path(str(path)).expanduser()
    try:
        if local.is_file():
            builder = FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise UserError(
                    f"{key}={path}: unsupported file type '{local.suffix}'. Fix: use a .json, .jsonl, "
                    ".parquet or .csv file, or a hub data set id."
                )
            return local_dataset(builder, local)
        if is_hub_id(str(path)):
            return load_dataset(str(path), name, split=split)
    except UserError:
        raise
    except Exception as err:  # unreadable file, unknown split or configuration, no network
        if "Config name is missing" in str(err):
            raise UserError(
                f"{key}={path} is a hub data set with several configurations and none was chosen "
                f"({' '.join(str(err).split())[:300]}). Fix: name one with data.name=<configuration>."
            ) from None
        bad = _bad_json_line(local) if local.is_file() else None
        if bad:
            raise UserError(
                f"{key}={path}: line {bad[0]} is not a JSON object ({bad[1]}). Fix: repair or remove that "
                "line (each line of a .jsonl file is one pair)."
            ) from None
        raise UserError(
            f"Could not load preference data {path} (split {split}): {type(err).__name__}: {err}. "
            f"Fix: check {key} and the split name."
        ) from None
    raise UserError(
        f"{key}={path} is neither a file nor a hub data set id. Fix: pass a local json/jsonl/parquet/"
        "csv file or org/name."
    )


def _bad_json_line(file: Path) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not a JSON object (number, reason), or None."""
    import json

    if file.suffix.lower() not in (".jsonl", ".json"):
        return None
    with open(file, encoding="utf-8", errors="replace") as handle:
        first = handle.read(1)
        if file.suffix.lower() == ".json" and first == "[":
            return None  # one JSON array: not line by line
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                return number, str(err)
            if not isinstance(row, dict):
                return number, f"a {type(row).__name__}"
    return None


def map_columns(ds, columns: dict, split: str, keep: tuple[str, ...] = ()):
    """Rename the configured columns to TRL's names; fold an optional system column into the prompt."""
    system = columns.pop("system", None)
    wanted = {source: target for target, source in columns.items() if source}
    implicit = columns.get("prompt") and columns["prompt"] not in ds.column_names
    if implicit:  # implicit-prompt data: TRL extracts the shared prefix of chosen and rejected
        wanted.pop(columns["prompt"])
    missing = [source for source in [*wanted, *([system] if system else [])] if source not in ds.column_names]
    if missing:
        raise UserError(
            f"The {split} preference data lacks column(s) {missing} (it has {ds.column_names}). Fix: "
            "map your columns with data.columns.prompt=..., data.columns.chosen=..., "
            "data.columns.rejected=... (and data.columns.system=... if any)."
        )
    ds = ds.rename_columns({s: t for s, t in wanted.items() if s != t})
    ds = _text_columns(ds)
    if implicit:
        refuse_lost_prompt(ds, columns, split, keep)
    if system:
        ds = ds.map(
            _with_system, fn_kwargs={"column": system}, remove_columns=[system], desc=f"Adding system prompts ({split})"
        )
    if implicit:
        from trl.data_utils import extract_prompt

        ds = ds.map(extract_prompt, desc=f"Extracting implicit prompts ({split})")
        empty = sum(not _text(p).strip() or p == [] for p in ds["prompt"])
        if empty:
            raise UserError(
                f"The {split} preference data has no prompt column ('{columns['prompt']}'), and TRL's "
                f"implicit-prompt extraction (the shared start of chosen and rejected) leaves {empty} of "
                f"{len(ds)} pairs with an empty prompt. Fix: add the prompt as a column and name it with "
                "data.columns.prompt=<column>, or write each pair's conversation into chosen and rejected."
            )
    return ds.select_columns([c for c in dict.fromkeys((*COLUMNS, *keep)) if c in ds.column_names])


def refuse_lost_prompt(ds, columns: dict, split: str, keep: tuple[str, ...]) -> None:
    """String pairs without the prompt column but with another text column: that column is most likely the prompt,
    and implicit-prompt extraction would drop it without a word."""
    from datasets import Value

    used = {"chosen", "rejected", columns.get("system"), *keep}
    other = [
        name
        for name, feature in ds.features.items()
        if name not in used and isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    ]
    strings = isinstance(ds.features.get("chosen"), Value)
    if strings and other:
        raise UserError(
            f"The {split} preference data has no '{columns['prompt']}' column but has the text column(s) "
            f"{other}, which would be dropped: without a prompt column the pairs are read as implicit-prompt data "
            f"(the prompt is the shared start of chosen and rejected). Fix: name the prompt column, "
            f"data.columns.prompt={other[0]}."
        )


def _text_columns(ds):
    """Answers like `46` arrive as numbers from CSV (or JSON) files: read them as text."""
    from datasets import Value

    for column in COLUMNS:
        feature = ds.features.get(column)
        if isinstance(feature, Value) and feature.dtype not in ("string", "large_string"):
            ds = ds.cast_column(column, Value("string"))
    return ds


def _with_system(row: dict, column: str) -> dict:
    as_messages = lambda value, role: value if isinstance(value, list) else [{"role": role, "content": value}]
    return {
        "prompt": [{"role": "system", "content": row[column]}, *as_messages(row["prompt"], "user")],
        "chosen": as_messages(row["chosen"], "assistant"),
        "rejected": as_messages(row["rejected"], "assistant"),
    }


def drop_bad_rows(ds):
    """Drop empty rows and rows whose chosen equals rejected; returns the data and the counts."""

    def reason(row) -> str | None:
        if any(not _text(row[c]).strip() for c in COLUMNS):
            return "empty"
        if _text(row["chosen"]) == _text(row["rejected"]):
            return "chosen_equals_rejected"
        return None

    reasons = [reason(row) for row in ds]
    counts = {r: reasons.count(r) for r in ("empty", "chosen_equals_rejected")}
    return ds.select([i for i, r in enumerate(reasons) if r is None]), counts


def _text(value) -> str:
    if isinstance(value, list):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def rows_fingerprint(ds) -> str:
    """A content hash of the rows (stable across processes, unlike in-memory fingerprints)."""
    digest = hashlib.sha256()
    for row in ds:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def write_store(scored, path: Path) -> None:
    """One parquet file: the pairs, their reference log-probs and a `split` column (train / heldout)."""
    from datasets import concatenate_datasets

    parts = [ds.add_column("split", [name] * len(ds)) for name, ds in scored.items()]
    concatenate_datasets(parts).to_parquet(str(path))


def local_dataset(builder: str, path: Path):
    """A local file through one of datasets' packaged builders (json, parquet, csv). datasets would ping the hub's S3
    bucket to count a "download" of the builder on every such load, unless HF_HUB_OFFLINE was set before it was
    imported: a local file asks no host anything."""
    from unittest import mock

    import datasets

    with mock.patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False):
        return datasets.load_dataset(builder, data_files=str(path), split="train")


def read_store(path: Path):
    from datasets import DatasetDict

    table = local_dataset("parquet", path)
    return DatasetDict(
        {
            name: table.filter(lambda s, name=name: s == name, input_columns="split").remove_columns("split")
            for name in ("train", "heldout")
        }
    )


def sources(data: DataSettings) -> dict:
    """Where the pairs came from: absolute paths for local files, ids for hub data sets."""
    where = lambda ref: str(Path(ref).expanduser().resolve()) if ref and Path(ref).expanduser().exists() else ref
    return {"path": where(data.path), "heldout": where(data.heldout.path)}


def padded_lengths(tokenized, max_length: int | None) -> list[int]:
    """Each tokenized pair's row length in TRL's DPO batch (prompt_ids, chosen_ids, rejected_ids): chosen and
    rejected are stacked and padded together, so a pair costs its prompt plus the longer answer (cut at
    max_length)."""
    prompts, chosen, rejected = (tokenized[name][:] for name in ("prompt_ids", "chosen_ids", "rejected_ids"))
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
    return [min(n, max_length) for n in lengths] if max_length else lengths
