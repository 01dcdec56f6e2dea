"""Model references: local folders or hub ids, turned into absolute local folders mergekit can read offline."""

import ctypes
import functools
import gc
import hashlib
import re
from pathlib import Path

from pipeline import UserError
from pipeline.records import ModelSource

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
            f"{Path.cwd()}) or a hub id of the form org/name[@revision] in models.parents / models.base."
        )
    check_checkpoint(path)
    return ModelSource(path=str(path.resolve()))


def check_checkpoint(path: Path) -> None:
    """A Hugging Face model folder with safetensors weights; pickled .bin weights are refused."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json). Fix: point at the folder "
                        "that holds config.json and the *.safetensors weights.")
    if not any(path.glob("*.safetensors")):
        hint = (" It holds pickled .bin weights, which merge-anneal does not load: convert them to safetensors "
                "first (e.g. load with transformers and save_pretrained).") if any(path.glob("*.bin")) else ""
        raise UserError(f"{path} has no *.safetensors weights.{hint} Fix: use a checkpoint saved as safetensors.")


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
    check_checkpoint(Path(folder))
    return ModelSource(path=str(Path(folder).resolve()), hub_id=repo_id, revision=commit)


def fingerprint(folder: str | Path) -> str:
    """sha256 over the names and contents of a model folder's files (what a cache key needs). Remembered for
    the life of the process while every file keeps its size and modification time, so the jobs of a sweep
    (one process with Hydra's basic launcher) hash a parent once."""
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = tuple((str(f.relative_to(root)), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
    return _fingerprint(root, stamp)


@functools.lru_cache(maxsize=64)
def _fingerprint(root: Path, stamp: tuple) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(16 << 20))  # big reads: hashing and reading release the GIL, so a thread
    for name, _, _ in stamp:                  # hashing overlaps the caller's Python work (few GIL hand-overs)
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

    return hashlib.sha256(json.dumps({"vocab": sorted(tokenizer.get_vocab().items()),
                                      "template": tokenizer.chat_template, "eos": tokenizer.eos_token,
                                      "pad": tokenizer.pad_token}, sort_keys=True).encode()).hexdigest()


def count_parameters(folder: str | Path) -> int:
    """Parameters in a model folder, read from the safetensors headers (no weights loaded)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            total += sum(prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


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
        raise UserError(f"{what} ({model_dir}) does not share the merged model's vocabulary (tokens {len(other)} vs "
                        f"{len(tokenizer)}, embedding rows {other_rows} vs {embedding_rows}); scoring it with the "
                        f"merged model's token ids would be meaningless. Fix: {fix}")


def release_memory() -> None:
    """Collect garbage, then hand freed heap pages back to the OS: glibc keeps them otherwise (torch allocates
    tensors under the mmap threshold from the heap; under `perf.malloc_keeps_freed_memory` that is every block up
    to 32 MiB, and only 1 GiB free at the heap top would be trimmed), and they would count in a later peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
