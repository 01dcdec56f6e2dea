"""Model references (local folders or hub ids, turned into absolute local folders mergekit can read offline), and
loading and saving models in the dtypes they are used in."""

import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import re
from pathlib import Path

from pipeline import UserError
from pipeline.records import ModelSource

log = logging.getLogger(__name__)

# What a merge needs from a hub repo: config, safetensors weights, tokenizer files and the chat template
# (mergekit's own download filter skips `chat_template.jinja`).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt", "vocab.txt", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(ref: str) -> bool:
    """`org/name` or `org/name@revision` that is not an existing local path."""
    return bool(_HUB_ID.match(ref)) and not Path(ref.split("@")[0]).expanduser().exists()


def resolve(ref: str) -> ModelSource:
    """Where a model reference points: an absolute local folder, and for a hub id the id and the commit that was
    downloaded (safetensors only). The record travels to the manifest, the model card and the sweep summary."""
    if is_hub_id(ref):
        return download(ref)
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise UserError(
            f"Model folder not found: {ref}. Fix: pass an existing local folder (absolute, or relative to "
            f"{Path.cwd()}) or a hub id of the form org/name[@revision], in models.parents / models.base for a preset "
            "or in the `model:` fields of your mergekit YAML for +merge=custom."
        )
    check_checkpoint(path)
    return ModelSource(path=str(path.resolve()))


def check_checkpoint(path: Path) -> None:
    """A Hugging Face model folder whose files are whole: config.json parses, every shard the index lists is
    there, and every safetensors file is as long as its header says (a truncated download or a full disk shows
    here, not as a traceback inside mergekit or transformers). Pickled .bin weights are refused."""
    config = path / "config.json"
    if not config.is_file():
        raise UserError(
            f"{path} is not a Hugging Face model folder (no config.json). Fix: point at the folder "
            "that holds config.json and the *.safetensors weights."
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = (
            (
                " It holds pickled .bin weights, which merge-anneal does not load: convert them to safetensors "
                "first (e.g. load with transformers and save_pretrained)."
            )
            if any(path.glob("*.bin"))
            else ""
        )
        raise UserError(f"{path} has no *.safetensors weights.{hint} Fix: use a checkpoint saved as safetensors.")
    damaged = "Fix: download or copy the checkpoint again (for a hub model, delete its snapshot folder)."
    for name in (config, *path.glob("*.safetensors.index.json")):
        try:
            content = json.loads(name.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{name} does not parse as JSON ({err}): the checkpoint is damaged. {damaged}") from None
        if name.name.endswith(".index.json"):
            missing = sorted(set(content.get("weight_map", {}).values()) - {f.name for f in files})
            if missing:
                raise UserError(
                    f"{name} lists weight shards that are not in {path}: {', '.join(missing)} (an "
                    f"interrupted download?). {damaged}"
                )
    for file in files:
        problem = safetensors_problem(file)
        if problem:
            raise UserError(f"{file} is {problem}. {damaged}")


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be whole (read from its header alone), or None: the 8-byte header length,
    the JSON header, and the file's length against the end of the last tensor it declares."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, no safetensors header)"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"truncated or not a safetensors file (its header claims {length} bytes, the file has {size})"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return "corrupt (its safetensors header does not parse)"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"truncated or corrupt ({size} bytes where its header accounts for {expected})"
    return None


def download(ref: str) -> ModelSource:
    """Fetch a hub model (weights as safetensors, tokenizer, chat template) into the Hugging Face cache, pinned
    to the commit the revision names now (asked first, so the record says which commit was read)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    repo_id, _, revision = ref.partition("@")
    try:
        if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1: the cached snapshot, whose folder is named by its commit
            folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
            commit = Path(folder).name
        else:
            commit = HfApi().model_info(repo_id, revision=revision or None).sha
            folder = snapshot_download(repo_id, revision=commit, allow_patterns=HUB_PATTERNS)
    except Exception as err:  # offline, unknown repo, gated repo, missing token: all user-fixable
        raise UserError(
            f"Could not fetch {ref} from the Hugging Face hub ({type(err).__name__}: {err}). Fix: check the id "
            "and revision, the network, and HF_TOKEN for gated or private repos, or pass a local folder."
        ) from None
    try:
        check_checkpoint(Path(folder))
    except UserError:  # a partial or damaged snapshot is fetched again, not trusted
        if constants.HF_HUB_OFFLINE:
            raise
        log.warning(f"{ref}: the cached snapshot is damaged; downloading it again")
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=HUB_PATTERNS, force_download=True)
        check_checkpoint(Path(folder))
    return ModelSource(path=str(Path(folder).resolve()), hub_id=repo_id, revision=commit)


def fingerprint(folder: str | Path, memo: Path | None = None) -> str:
    """sha256 over the names and contents of a model folder's files (what a cache key needs). Remembered for
    the life of the process while every file keeps its size, modification time and inode, so the jobs of a sweep
    (one process with Hydra's basic launcher) hash a parent once; with `memo` (a folder), across processes too
    (as git's index trusts a file's stat)."""
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = tuple((str(f.relative_to(root)), st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()])
    if memo is None:
        return _fingerprint(root, stamp)
    remembered = Path(memo) / f"{hashlib.sha256(str(root).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(remembered.read_text())
        if [tuple(entry) for entry in known["stamp"]] == list(stamp):
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _fingerprint(root, stamp)
    remembered.parent.mkdir(parents=True, exist_ok=True)
    partial = remembered.with_name(f".{remembered.name}.{os.getpid()}")
    partial.write_text(json.dumps({"folder": str(root), "stamp": stamp, "sha256": digest}))
    partial.replace(remembered)
    return digest


@functools.lru_cache(maxsize=64)
def _fingerprint(root: Path, stamp: tuple) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(16 << 20))  # big reads: hashing and reading release the GIL, so a thread
    for name, *_ in stamp:  # hashing overlaps the caller's Python work (few GIL hand-overs)
        digest.update(name.encode() + b"\0")
        content = hashlib.sha256()
        with (root / name).open("rb") as handle:
            while size := handle.readinto(buffer):
                content.update(buffer[:size])
        digest.update(content.digest())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what scoring with a tokenizer depends on: vocabulary, chat template, EOS and padding tokens."""
    import json

    return hashlib.sha256(
        json.dumps(
            {
                "vocab": sorted(tokenizer.get_vocab().items()),
                "template": tokenizer.chat_template,
                "eos": tokenizer.eos_token,
                "pad": tokenizer.pad_token,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()


def count_parameters(folder: str | Path) -> int:
    """Parameters in a model folder, read from the safetensors headers (no weights loaded)."""
    return sum(count for _, count in _tensors(folder))


def _tensors(folder: str | Path):
    """(dtype, element count) of every tensor in a model folder's safetensors files, from their headers."""
    from math import prod

    from safetensors import safe_open

    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                yield tensor.get_dtype(), prod(tensor.get_shape())


def check_same_vocabulary(tokenizer, merged_dir: Path, model_dir: str | Path, what: str, fix: str) -> None:
    """A model fed the merged model's token ids (`tokenizer`) must share its vocabulary: the same tokens and the
    same number of embedding rows (TRL does not check; a `union` tokenizer merge changes both)."""
    from transformers import AutoConfig, AutoTokenizer

    embedding_rows = AutoConfig.from_pretrained(merged_dir).vocab_size
    try:
        other = AutoTokenizer.from_pretrained(model_dir)
        other_rows = AutoConfig.from_pretrained(model_dir).vocab_size
    except (OSError, ValueError) as err:
        raise UserError(f"{what} ({model_dir}) has no loadable tokenizer or config ({err}). Fix: {fix}") from None
    if other.get_vocab() != tokenizer.get_vocab() or other_rows != embedding_rows:
        raise UserError(
            f"{what} ({model_dir}) does not share the merged model's vocabulary (tokens {len(other)} vs "
            f"{len(tokenizer)}, embedding rows {other_rows} vs {embedding_rows}); scoring it with the "
            f"merged model's token ids would be meaningless. Fix: {fix}"
        )


def release_memory() -> None:
    """Collect garbage, then hand freed heap pages back to the OS: glibc keeps them otherwise (torch allocates
    tensors under the mmap threshold from the heap; under `perf.malloc_keeps_freed_memory` that is every block up
    to 32 MiB, and only 1 GiB free at the heap top would be trimmed), and they would count in a later peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def stored_dtype(folder: str | Path) -> str:
    """The dtype most of a checkpoint's bytes are stored in ("BF16", "F32", ...), read from safetensors headers."""
    from collections import Counter

    sizes = Counter()
    for dtype, count in _tensors(folder):
        sizes[dtype] += count
    return sizes.most_common(1)[0][0] if sizes else "F32"
