"""The anneal stage's performance machinery: each piece a context manager behind one switch in `anneal.perf`.

None of it changes what is trained: with every switch off the stage trains as plain TRL does with precomputed
reference columns (tested), and each switch's effect is measured by `python bench/anneal_vs_trl.py --sizes 100m
--switches` (94.5M-parameter Llama, 2 CPU cores, bf16 autocast; figures in conf/anneal/dpo.yaml). The precision
decision is taken once, in `decide_precision`, and written to the manifest verbatim. Process-wide settings
(malloc, GC) are restored when their block ends.
"""

import contextlib
import ctypes
import gc
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import models
from stages.anneal import packing

# glibc's mallopt parameters (malloc.h) and their documented defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DEFAULT_TRIM_THRESHOLD = DEFAULT_MMAP_THRESHOLD = 128 * 1024
FLOAT32_SDPA = "merge_anneal_sdpa_float32"


# ------------------------------------------------------------------------------------------------ precision


@dataclass(frozen=True)
class Precision:
    """How the anneal stage computes, decided once (`decide_precision`) and recorded verbatim."""

    master_weights: str  # always float32: the optimizer updates float32 weights
    autocast: str | None  # bf16 autocast of the forward and backward, or None
    frozen_linear_weights: str  # LoRA's frozen base Linear weights
    attention: str  # the dtype attention runs in
    autocast_weight_cache: bool | None  # autocast's cache of weight casts (None without autocast)
    reference_linear_weights: str  # the reference pass's Linear weights

    def record(self) -> dict:
        return asdict(self)


def decide_precision(anneal, n_params: int, cuda: bool | None = None) -> Precision:
    """The anneal's precision from its config (`anneal.trainer.bf16`: true, false or auto; `anneal.peft`; the
    switches in `anneal.perf`): master weights float32; under bf16 autocast, what the switches make of the rest."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    bf16 = anneal.trainer["bf16"]
    bf16 = bf16_pays(n_params, cuda) if bf16 == "auto" else bool(bf16)
    lora, perf = anneal.peft is not None, anneal.perf
    return Precision(
        master_weights="float32",
        autocast="bfloat16" if bf16 else None,
        frozen_linear_weights=(
            "nf4" if anneal.quantization else "bfloat16" if bf16 and lora and perf.frozen_weights_bf16 else "float32"
        ),
        # CPU only (CUDA's bf16 attention is fast), full fine-tuning only (LoRA's peak is its activations)
        attention="float32" if not bf16 or (perf.float32_attention and not cuda and not lora) else "bfloat16",
        autocast_weight_cache=(not perf.lean_saved_tensors) if bf16 else None,
        reference_linear_weights="bfloat16" if bf16 and perf.reference_weights_bf16 else "float32",
    )


def bf16_pays(n_params: int, cuda: bool) -> bool:
    """`bf16: auto`: bf16 autocast where it pays: a CUDA GPU with bf16, or a CPU with bf16 matrix instructions
    (AMX / AVX512-BF16) and a model big enough to be compute-bound (measured: 2.4x per DPO step at 100M
    parameters on this project's CPUs; tiny models are overhead-bound and gain nothing)."""
    if cuda:
        import torch

        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return n_params >= 30_000_000 and ("amx_bf16" in flags or "avx512_bf16" in flags)


def reference_batch_size(train_batch_size: int, max_length: int | None, tokens: int = 4096) -> int:
    """`reference_pass_tokens`: pairs per no-grad forward of the reference pass, enough for about `tokens`
    tokens (a pair is up to 2 x max_length), at least the training batch."""
    return max(train_batch_size, tokens // (2 * (max_length or 1024)))


class PhaseClock:
    """Wall seconds by phase (a phase named twice adds up), for the manifest."""

    def __init__(self):
        self.seconds, self._last = {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now


# ------------------------------------------------------------------------------------------ process settings


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


@contextlib.contextmanager
def malloc_keeps_freed_memory(enabled: bool):
    """glibc malloc keeps freed blocks (up to 32 MiB each) for reuse instead of handing them back to the OS.
    Training frees and allocates the same activation and gradient buffers every step; glibc's defaults trim the
    heap top after each free and page the memory in again (zeroed) at the next step. A 1 GiB trim threshold and
    the mmap threshold pinned at its 32 MiB maximum: minor page faults 1.46M -> 0.67M at 94.5M (full
    fine-tuning, peak RSS within noise). `models.release_memory` still trims between phases. On exit glibc's
    default thresholds (128 KiB) are set back. Yields whether glibc took the settings."""
    libc = _libc() if enabled else None
    taken = bool(libc and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    try:
        yield taken
    finally:
        if taken:
            libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


@contextlib.contextmanager
def gc_skips_existing_objects(enabled: bool):
    """Full garbage collections skip the objects that exist now (with torch, transformers, TRL and datasets
    imported: the libraries' modules, functions and classes) until the block ends. Each full collection
    (`release_memory`, accelerate's before training) traversed them all: 0.82 -> 0.02 s in all at 94.5M. Yields
    how many objects were set aside; a caller's own `gc.freeze()` is left alone (0)."""
    if not enabled or gc.get_freeze_count():
        yield 0
        return
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def fingerprint_in_background(folder, enabled: bool):
    """Yields a Future of `models.fingerprint(folder)`, computed in a thread while the block runs (the imports:
    hashing and file reads release the GIL), or at once when not enabled."""
    if not enabled:
        done = Future()
        done.set_result(models.fingerprint(folder))
        yield done
        return
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(models.fingerprint, folder)


@contextlib.contextmanager
def known_model_hash(fingerprint: str, enabled: bool):
    """With precompute on, DPOTrainer.__init__ hashes the whole model (a full fp32 copy, tensor by tensor) only to
    name its own cache; the reference's file fingerprint, computed already, names it just as well."""
    if not enabled:
        yield
        return
    from trl.trainer import dpo_trainer

    original = dpo_trainer.hash_module
    dpo_trainer.hash_module = lambda module: fingerprint
    try:
        yield
    finally:
        dpo_trainer.hash_module = original


# ------------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def training(trainer, model, precision: Precision, perf):
    """Everything that applies while the policy trains; yields what applied (for the manifest)."""
    with contextlib.ExitStack() as stack:
        applied = {
            "frozen_base_in_bf16": stack.enter_context(
                frozen_base_in_bf16(trainer.model, precision.frozen_linear_weights == "bfloat16")
            ),
            "float32_attention": stack.enter_context(
                float32_attention(model, precision.autocast is not None and precision.attention == "float32")
            ),
        }
        lean = stack.enter_context(lean_saved_tensors(trainer, perf.lean_saved_tensors, precision.autocast))
        fused = getattr(trainer.model, "get_base_model", lambda: trainer.model)()  # where TRL put its fused head
        applied["packing"] = stack.enter_context(packing.packed(fused, perf.pack_rows))
        yield applied
        applied["saved_for_backward"] = dict(lean.counts) if lean else {}


@contextlib.contextmanager
def frozen_base_in_bf16(model, enabled: bool):
    """LoRA under bf16 autocast: the frozen Linear weights stored in bf16 (`frozen_linears_to_bf16`), and PEFT's
    float32 round trip of a bf16 input before the adapter switched off (autocast casts it straight back: the
    same numbers, one copy fewer per layer). Yields whether it applied."""
    if not enabled:
        yield False
        return
    import torch
    from peft.helpers import disable_input_dtype_casting

    frozen_linears_to_bf16(model)
    # What stays float32 may be a view of the checkpoint's memory map, which would keep the whole file (the
    # float32 weights just cast included) mapped and resident: give it memory of its own.
    for param in model.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.clone()
    models.release_memory()  # the float32 copies just dropped, and the reference pass's leftovers
    with disable_input_dtype_casting(model):
        yield True


def frozen_linears_to_bf16(model) -> int:
    """Under bf16 autocast a frozen Linear's float32 weight is only ever used through its bf16 cast, so store
    it in bf16: the same numbers, half the bytes, no cast at every step. Trainable weights (the LoRA adapter)
    stay float32 master weights. Returns how many layers were cast."""
    import torch

    frozen = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    for module in frozen:
        module.to(torch.bfloat16)
    return len(frozen)


@contextlib.contextmanager
def float32_attention(model, enabled: bool):
    """Train with attention in float32 under CPU bf16 autocast: transformers' own SDPA attention, its inputs
    upcast and autocast off inside, because on CPU SDPA's bf16 backward kernel is slower than its float32 one.
    The model's attention is restored afterwards (saved configs name
    a standard one). Yields whether it applied."""
    if not enabled:
        yield False
        return
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast(query.device.type, enabled=False):
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)

    AttentionInterface.register(FLOAT32_SDPA, attention)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)  # the masks SDPA takes
    original = model.config._attn_implementation
    model.set_attn_implementation(FLOAT32_SDPA)
    try:
        yield True
    finally:
        model.set_attn_implementation(original)


@contextlib.contextmanager
def lean_saved_tensors(trainer, enabled: bool, autocast: str | None):
    """Train with `LeanSavedTensors` hooks. Under bf16 autocast, autocast's weight cache is switched off as
    well: it would hold the bf16 copy of every weight until the forward ends (each weight is cast once per
    forward either way). Yields the hooks (their `counts` say what was stored leaner), or None."""
    if not enabled:
        yield None
        return
    import torch

    if autocast:
        from accelerate.utils import AutocastKwargs

        trainer.accelerator.autocast_handler = AutocastKwargs(cache_enabled=False)  # read when train() wraps forward
    hooks = LeanSavedTensors()
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield hooks


class LeanSavedTensors:
    """Saved-tensor hooks that keep less for the backward pass; every gradient stays bit-identical.

    - A bf16 cast of a float32 parameter (autocast casts every weight for its matmul, and autograd keeps the
      copy: 2 bytes per parameter at the activation peak) is stored as the parameter and cast again in backward.
    - SiLU's output is recomputed from its input, which SiLU keeps anyway; so is the gated product
      silu(gate) * up, whose factors the product keeps (Llama's MLP would store all four).
    - Casts of one tensor to one dtype are stored once (autocast casts a layer's input once per consumer: q, k,
      v); the same autograd source means the same values, so no comparison of contents is needed.
    """

    def __init__(self):
        from collections import Counter, deque

        self.counts = Counter()
        self._recent_casts = deque(maxlen=8)  # weak references: a cast lives only as long as autograd keeps it

    def pack(self, tensor):
        base = tensor if tensor._base is None else tensor._base
        node = base.grad_fn
        view = (tensor.size(), tensor.stride(), tensor.storage_offset())
        if node is None or base.storage_offset() != 0:
            return tensor
        if node.name() == "SiluBackward0":
            self.counts["silu_recomputed"] += 1
            return "silu", node, view
        factors = [f for f, _ in node.next_functions]
        if (
            node.name() == "MulBackward0"
            and all(f is not None for f in factors)  # both need grad: both kept
            and any(f.name() == "SiluBackward0" for f in factors)
        ):
            self.counts["gated_product_recomputed"] += 1  # silu(gate) * up, whose factors the mul keeps
            return "product", node, view
        if node.name() != "ToCopyBackward0":
            return tensor
        param = getattr(node.next_functions[0][0], "variable", None)  # AccumulateGrad of a leaf
        if param is not None and param.shape == base.shape and param.dtype != base.dtype and base.is_contiguous():
            self.counts["parameter_cast_recomputed"] += 1
            return "cast", param, view, base.dtype
        source = node.next_functions[0]  # (autograd node, output): the tensor this was cast from
        for ref in self._recent_casts:
            other = ref()  # alive: so are its grad_fn and the node it was cast from, and identity is safe
            if (
                other is not None
                and other is not base
                and other.dtype == base.dtype
                and other.shape == base.shape
                and other.stride() == base.stride()
                and other.storage_offset() == 0
                and other.grad_fn.next_functions[0] == source
            ):
                self.counts["equal_cast_shared"] += 1
                return "same", other, view
        self._recent_casts.append(weakref.ref(base))
        return tensor

    @staticmethod
    def unpack(packed):
        import torch

        if not isinstance(packed, tuple):
            return packed
        kind, source, view, *dtype = packed
        if kind == "silu":
            value = torch.nn.functional.silu(source._saved_self)
        elif kind == "product":
            value = source._saved_self * source._saved_other
        elif kind == "cast":
            value = source.detach().to(dtype[0])
        else:
            value = source
        return value.as_strided(*view)
