"""stages/anneal/perf.py: each switch of `anneal.perf` works both ways, none changes what is trained (with every
switch off the stage trains exactly as plain TRL with precomputed reference columns), the precision decision,
and the process-wide settings restored. All on the tiny random parents (fast tier)."""

import contextlib
import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, TEST_CACHE
from pipeline import models
from pipeline.app import run_pipeline
from pipeline.settings import DataSettings
from stages.anneal import perf, training
from stages.anneal.settings import AnnealSettings

SWITCHES = (
    "lean_saved_tensors",
    "float32_attention",
    "frozen_weights_bf16",
    "reference_weights_bf16",
    "reference_pass_tokens",
    "malloc_keeps_freed_memory",
    "gc_skips_existing_objects",
    "fingerprint_in_background",
    "skip_trl_model_hash",
    "pack_rows",
)
ALL_OFF = [f"anneal.perf.{name}={'null' if name == 'reference_pass_tokens' else 'false'}" for name in SWITCHES]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("perf-cache")


@pytest.fixture
def make_short_cfg(shared_cache, tiny):
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    f"pipeline.cache_dir={shared_cache}",
                    f"models.cache_dir={TEST_CACHE}",
                    "pipeline.stages=[merge,anneal]",
                    "pipeline.cache=false",
                    # the switches were measured without recomputation (it would
                    # recompute what LeanSavedTensors stores leaner)
                    "anneal.trainer.activation_checkpointing=false",
                    *tiny.overrides,
                    *overrides,
                ],
            )

    return _compose


def test_every_switch_is_documented_in_the_config(make_short_cfg):
    assert set(make_short_cfg("+merge=slerp").anneal.perf) == set(SWITCHES)


def test_precision_is_decided_once_from_the_switches(make_short_cfg):
    def decide(bf16, lora, cuda, switches_off=False):
        cfg = make_short_cfg(
            "+merge=slerp",
            f"anneal.trainer.bf16={bf16}",
            *(["anneal=lora"] if lora else []),
            *(ALL_OFF if switches_off else []),
        )
        return perf.decide_precision(AnnealSettings.of(cfg.anneal, "anneal"), n_params=10**6, cuda=cuda)

    fp32 = decide("false", lora=False, cuda=False)
    assert fp32.record() == {
        "master_weights": "float32",
        "autocast": None,
        "frozen_linear_weights": "float32",
        "attention": "float32",
        "autocast_weight_cache": None,
        "reference_linear_weights": "float32",
    }
    assert decide("false", lora=True, cuda=False) == fp32
    assert decide("auto", lora=False, cuda=False) == fp32  # a tiny model on a CPU: autocast does not pay
    full = decide("true", lora=False, cuda=False)
    assert (
        full.autocast,
        full.attention,
        full.autocast_weight_cache,
        full.reference_linear_weights,
        full.frozen_linear_weights,
    ) == ("bfloat16", "float32", False, "bfloat16", "float32")
    assert decide("true", lora=False, cuda=True).attention == "bfloat16"  # CUDA: fast bf16
    lora = decide("true", lora=True, cuda=False)
    assert (lora.attention, lora.frozen_linear_weights) == ("bfloat16", "bfloat16")
    plain = decide("true", lora=True, cuda=False, switches_off=True)
    assert plain.record() == {
        "master_weights": "float32",
        "autocast": "bfloat16",
        "frozen_linear_weights": "float32",
        "attention": "bfloat16",
        "autocast_weight_cache": True,
        "reference_linear_weights": "float32",
    }


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_switch_on_and_off_in_the_stage(lora, make_short_cfg, tmp_path):
    """The same bf16-autocast run with every switch on, then off: each switch's effect is in the manifest when on
    and absent when off."""
    common = ["+merge=slerp", "anneal.trainer.bf16=true", *(["anneal=lora"] if lora else [])]
    on = run_pipeline(make_short_cfg(*common), tmp_path / "on")["stages"]["anneal"]
    off = run_pipeline(make_short_cfg(*common, *ALL_OFF), tmp_path / "off")["stages"]["anneal"]
    assert on["precision"]["master_weights"] == off["precision"]["master_weights"] == "float32"
    assert on["perf"]["switches"]["lean_saved_tensors"] and not off["perf"]["switches"]["lean_saved_tensors"]
    # lean_saved_tensors: leaner saved tensors, autocast's weight cache off
    assert on["saved_for_backward"]["silu_recomputed"] > 0 and off["saved_for_backward"] == {}
    assert (on["precision"]["autocast_weight_cache"], off["precision"]["autocast_weight_cache"]) == (False, True)
    # float32_attention (full fine-tuning only) and frozen_weights_bf16 (LoRA only)
    packed = on["perf"]["applied"].pop("packing")  # pack_rows: every training forward seen (anneal/test_packing.py)
    assert packed["rows"] > 0 and packed["packed_positions"] <= packed["positions"]
    assert off["perf"]["applied"].pop("packing") is None
    assert on["perf"]["applied"] == {"float32_attention": not lora, "frozen_base_in_bf16": lora}
    assert off["perf"]["applied"] == {"float32_attention": False, "frozen_base_in_bf16": False}
    assert on["precision"]["attention"] == ("bfloat16" if lora else "float32")
    assert off["precision"]["attention"] == "bfloat16"
    assert on["precision"]["frozen_linear_weights"] == ("bfloat16" if lora else "float32")
    assert off["precision"]["frozen_linear_weights"] == "float32"
    # reference_weights_bf16
    assert (on["precision"]["reference_linear_weights"], off["precision"]["reference_linear_weights"]) == (
        "bfloat16",
        "float32",
    )
    # reference_pass_tokens: ~4096 tokens per forward, or TRL's own batch
    assert on["reference_batch_size"] == perf.reference_batch_size(4, 64)
    assert off["reference_batch_size"] is None
    # malloc_keeps_freed_memory and gc_skips_existing_objects
    assert on["process"]["malloc_keeps_freed_memory"] is True and off["process"]["malloc_keeps_freed_memory"] is False
    assert on["process"]["gc_skipped_objects"] > 1000 and off["process"]["gc_skipped_objects"] == 0
    # fingerprint_in_background: the same fingerprint either way
    expected = models.fingerprint(on["inputs"]["reference_path"])
    assert on["reference_fingerprint"] == off["reference_fingerprint"] == expected
    assert gc.get_freeze_count() == 0  # restored


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_with_every_switch_off_the_stage_trains_as_plain_trl(bf16, make_short_cfg, tmp_path, tiny):
    """Plain TRL with the parent as ref_model and precompute_ref_log_probs=True, on the same data and settings,
    ends with the same weights, bit for bit."""
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from pipeline import preferences

    # and TRL's random batches, named although they are the stage's default too (the stage can also group pairs by
    # length, which plain TRL 1.16 cannot: it drops the length column its sampler would need; test_anneal checks
    # the grouped batches)
    cfg = make_short_cfg(
        "+merge=slerp",
        f"anneal.trainer.bf16={str(bf16).lower()}",
        *ALL_OFF,
        "anneal.trainer.train_sampling_strategy=random",
    )
    stages = run_pipeline(cfg, tmp_path / "stage")["stages"]
    merged_dir = Path(stages["merge"]["outputs"]["model"])
    precision = perf.decide_precision(AnnealSettings.of(cfg.anneal, "anneal"), models.count_parameters(merged_dir))
    assert precision.record() == stages["anneal"]["precision"]  # the stage's decision, recorded verbatim
    args = training.dpo_config(AnnealSettings.of(cfg.anneal, "anneal"), tmp_path / "trl", precision)
    assert args.precompute_ref_log_probs and args.precompute_ref_batch_size is None
    pairs, _ = preferences.load_preferences(DataSettings.of(cfg.data, "data"))
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32),
        args=args,
        train_dataset=pairs["train"],
        processing_class=AutoTokenizer.from_pretrained(merged_dir),
    )
    trainer.train()
    theirs = {name: p.detach() for name, p in trainer.model.state_dict().items()}
    ours = load_file(Path(stages["anneal"]["outputs"]["model"]) / "model.safetensors")
    before = load_file(merged_dir / "model.safetensors")
    assert set(ours) == set(theirs)
    assert any(not torch.equal(ours[k], before[k]) for k in ours)  # it trained
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_known_model_hash_both_ways():
    from trl.trainer import dpo_trainer

    module = torch.nn.Linear(2, 2)
    real = dpo_trainer.hash_module(module)
    with perf.known_model_hash("files-fingerprint", True):
        assert dpo_trainer.hash_module(module) == "files-fingerprint"
    with perf.known_model_hash("files-fingerprint", False):
        assert dpo_trainer.hash_module(module) == real
    assert dpo_trainer.hash_module(module) == real


def test_fingerprint_in_background_both_ways(tiny):
    expected = models.fingerprint(tiny["add"])
    for enabled in (True, False):
        with perf.fingerprint_in_background(tiny["add"], enabled) as hashing:
            pass
        assert hashing.result() == expected


def test_gc_skips_existing_objects_only_inside_the_block():
    class Node:
        pass

    old = Node()
    with perf.gc_skips_existing_objects(True) as skipped:
        assert skipped > 1000 and gc.get_freeze_count() > 1000
        assert not any(o is old for o in gc.get_objects())  # set aside: full collections skip it
        cycle = Node()
        cycle.me = cycle
        del cycle
        assert gc.collect() >= 1  # what is made inside is still collected
    assert gc.get_freeze_count() == 0 and any(o is old for o in gc.get_objects())
    with perf.gc_skips_existing_objects(False) as skipped:
        assert skipped == 0 and gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is left alone
    try:
        with perf.gc_skips_existing_objects(True) as skipped:
            assert skipped == 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


MALLOC_CHECK = """
import ctypes
from stages.anneal import perf

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(size):
    libc.malloc_trim(0)  # no free heap memory left over: the allocation needs new memory
    before = libc.mallinfo2().hblks
    pointer = libc.malloc(size)
    after = libc.mallinfo2().hblks
    libc.free(pointer)
    return after - before

with perf.malloc_keeps_freed_memory(True) as taken:
    assert taken is True  # Linux with glibc: the settings are taken
    assert mmapped(1 << 20) == 0
assert mmapped(1 << 20) == 1
with perf.malloc_keeps_freed_memory(False) as taken:
    assert taken is False and mmapped(1 << 20) == 1
print("ok")
"""


def test_malloc_keeps_freed_memory_and_restores_the_defaults():
    """Inside the block a 1 MiB allocation comes from the heap (kept for reuse); after it glibc's default 128 KiB
    mmap threshold is back, so the same allocation is mmapped (and handed back to the OS when freed). In a fresh
    process: a heap fragmented by earlier tests could serve 1 MiB from a free chunk without asking for memory."""
    out = subprocess.run([sys.executable, "-c", MALLOC_CHECK], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_frozen_bf16_linears_compute_what_autocast_computes(tiny):
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids).logits
        assert perf.frozen_linears_to_bf16(model) == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
        cast = model(input_ids=ids).logits
        with perf.frozen_base_in_bf16(model, False) as applied:
            assert not applied
        with disable_input_dtype_casting(model):  # what frozen_base_in_bf16 adds
            uncast = model(input_ids=ids).logits
    torch.testing.assert_close(cast, reference, rtol=0, atol=0)
    torch.testing.assert_close(uncast, reference, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_float32_attention_under_cpu_autocast(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])  # left padding: SDPA gets a mask

    def run(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, attention_mask=mask).logits

    with torch.no_grad():
        plain, bf16_attention = run(False), run(True)
        with perf.float32_attention(model, True) as applied:
            assert applied and model.config._attn_implementation == perf.FLOAT32_SDPA
            same_in_fp32, fp32_attention = run(False), run(True)
    torch.testing.assert_close(same_in_fp32, plain, rtol=0, atol=0)  # transformers' SDPA, inputs already float32
    assert not torch.equal(fp32_attention, bf16_attention)  # under autocast the attention ran in float32
    assert model.config._attn_implementation == "sdpa"  # restored: a saved config names a standard attention
    model.save_pretrained(tmp_path)
    assert perf.FLOAT32_SDPA not in (tmp_path / "config.json").read_text()
    with perf.float32_attention(model, False) as applied:
        assert not applied and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_lean_saved_tensors_give_bit_identical_gradients(lora, autocast, checkpointing, tiny):
    """The anneal stage's saved-tensor hooks store less for backward; loss and gradients do not change a bit,
    with gradient checkpointing too."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    model = AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if autocast:
            perf.frozen_linears_to_bf16(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)

    def loss_and_grads(hooks):
        model.zero_grad(set_to_none=True)
        with contextlib.ExitStack() as stack:
            if hooks:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack))
            if lora and autocast:
                stack.enter_context(disable_input_dtype_casting(model))
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(None)
    hooks = perf.LeanSavedTensors()
    loss, grads = loss_and_grads(hooks)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    if checkpointing:  # the layers' tensors are saved by checkpointing's own hooks (innermost hooks win)
        return
    layers = 2
    assert hooks.counts["silu_recomputed"] == hooks.counts["gated_product_recomputed"] == layers
    if autocast:  # each weight's bf16 copy: q k v o gate up down per layer, lm_head. LoRA: the adapters' (the
        # frozen weights are bf16 already), less layer 0's q k v gate up lora_A, whose input needs no gradient
        assert hooks.counts["parameter_cast_recomputed"] == (2 * (layers * 7 + 1) - 5 if lora else layers * 7 + 1)
        # k and v share q's input cast, up shares gate's; with LoRA not in layer 0's attention, whose input
        # needs no gradient (its casts are not traced)
        assert hooks.counts["equal_cast_shared"] == 3 * layers - (2 if lora else 0)
    else:
        assert hooks.counts.keys() == {"silu_recomputed", "gated_product_recomputed"}


def test_lean_saved_tensors_keep_a_product_whose_factor_needs_no_gradient(tiny):
    """LoRA on gate_proj and down_proj: down's adapter saves the product silu(gate) * up, and in layer 0 up's
    output needs no gradient, so the product keeps only that factor and must be stored as it is (a recompute
    would find the other factor missing); the gradients stay bit-identical."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32),
        LoraConfig(r=4, target_modules=["gate_proj", "down_proj"], init_lora_weights=False),
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    grads = []
    for hooks in (None, perf.LeanSavedTensors()):
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack) if hooks else contextlib.nullcontext():
            model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert hooks.counts["gated_product_recomputed"] == 1  # layer 1 only
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
