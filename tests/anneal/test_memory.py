"""stages/anneal/memory.py: the anneal stage's memory plan. Pure arithmetic on configs (one tiny model for LoRA's
count)."""

import json

import pytest

from pipeline import UserError
from stages.anneal import memory

GIB = 2**30
LLAMA_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "num_attention_heads": 32,
}
N_7B = 6_740_000_000
ONE_24GIB_GPU = {"device": "cuda", "available": 24 * GIB}


def plan_7b(mode="full", **changes):
    settings = {
        "autocast": True,
        "batch_size": 4,
        "max_length": 512,
        "activation_checkpointing": False,
        "lora_r": None if mode == "full" else 16,
        **ONE_24GIB_GPU,
        **changes,
    }
    return memory.plan(LLAMA_7B, N_7B, mode=mode, **settings)


@pytest.mark.parametrize("r", [1, 8])
def test_lora_parameters_match_peft_all_linear(r):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        vocab_size=99,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = peft.get_peft_model(
        LlamaForCausalLM(config), peft.LoraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    trainable, _ = model.get_nb_trainable_parameters()
    assert memory.lora_parameters(config.to_dict(), r) == trainable


def test_full_fine_tuning_of_7b_does_not_fit_one_24gib_gpu():
    full = plan_7b()
    assert full.weights == full.gradients == 4 * N_7B and full.optimizer == 8 * N_7B
    assert 95 * GIB < full.weights + full.gradients + full.optimizer < 105 * GIB
    assert full.total == full.weights + full.gradients + full.optimizer + full.activations
    assert not full.fits()


def test_lora_and_qlora_shrink_the_weights():
    lora, qlora = plan_7b("lora"), plan_7b("qlora")
    assert 12 * GIB < lora.weights < 14 * GIB
    assert 3.5 * GIB < qlora.weights < 4.5 * GIB
    trainable = memory.lora_parameters(LLAMA_7B, 16)
    assert lora.gradients == qlora.gradients == 4 * trainable and lora.optimizer == 8 * trainable
    assert plan_7b("lora", autocast=False).weights > lora.weights + 12 * GIB  # frozen weights in float32


def test_sharding_divides_weights_gradients_and_optimizer():
    single, sharded = plan_7b(), plan_7b(processes=8, sharding="fsdp2")
    layer = 2 * sum(n_in * n_out for n_in, n_out in memory._layer_linears(LLAMA_7B))  # gathered in bf16
    assert sharded.weights == single.weights // 8 + layer
    assert (sharded.gradients, sharded.optimizer) == (single.gradients // 8, single.optimizer // 8)
    assert sharded.activations == single.activations
    ddp = plan_7b(processes=8)
    assert (ddp.weights, ddp.optimizer) == (single.weights, single.optimizer) and ddp.gradients > single.gradients


def test_activation_checkpointing_and_smaller_batches_lower_activations():
    base = plan_7b("lora")
    assert plan_7b("lora", activation_checkpointing=True).activations < base.activations / 3
    assert plan_7b("lora", batch_size=2).activations * 2 == base.activations
    assert plan_7b("lora", autocast=False).activations > base.activations


@pytest.mark.parametrize(
    "override",
    [
        "`anneal=lora`",
        "`anneal=qlora`",
        "distributed=fsdp2 distributed.num_processes=",
        "`anneal.trainer.activation_checkpointing=true`",
        "per_device_train_batch_size=2",
        "`anneal.memory_check=false`",
    ],
)
def test_check_names_the_fixes_and_the_way_out(override):
    with pytest.raises(UserError) as raised:
        memory.check(plan_7b())
    assert override in str(raised.value) and "\n" not in str(raised.value)


def test_a_fitting_plan_passes_the_check():
    fitting = plan_7b("qlora", batch_size=1, activation_checkpointing=True)
    assert fitting.fits() and memory.check(fitting) is None
    assert memory.plan(
        LLAMA_7B, N_7B, mode="full", autocast=True, batch_size=1, max_length=8, activation_checkpointing=False
    ).fits()  # available unknown


def test_record_is_json_ready_and_describe_is_one_line():
    plan = plan_7b("lora")
    record = json.loads(json.dumps(plan.record()))
    assert record["fits"] is plan.fits() and record["total"] == plan.total
    assert record["GiB"]["weights"] == round(plan.weights / GIB, 2)
    assert {
        "device",
        "processes",
        "sharding",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "total",
        "available",
    } <= set(record)
    line = plan.describe()
    assert line.startswith("memory plan per cuda device (1 process)") and "of 24.0 GiB available" in line
    assert "\n" not in line


def test_available_memory_on_this_cpu():
    """The CPU's figure is the kernel's MemAvailable, read independently here (it moves a little between reads)."""
    import os

    available = memory.available_memory("cpu")
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    kernel = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert isinstance(available, int) and abs(available - kernel) < 0.05 * kernel
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # never more than the machine has
    assert 0 < available <= total
    assert memory.available_memory("cuda") is None or memory.available_memory("cuda") > 0
