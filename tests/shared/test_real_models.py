"""Real checkpoints: TRL's defaults for anyone's data (the demo's recipe stays with the demo), the demo's pairs
refused for other parents, loading straight into the training dtypes, the memory plan, QLoRA's requirements."""

import importlib.util
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SHORT
from pipeline import UserError, manifest, models
from pipeline.app import check_data_fits_models, merge_inputs
from stages.anneal import perf, weights
from stages.anneal.settings import AnnealSettings

# The fields dpo.yaml keeps at TRL's DPOConfig defaults (the others carry a comment saying why not).
TRL_DEFAULTS = (  # all but the loss (README, "Which annealing recipe"): DPO + 0.2 SFT, not TRL's sigmoid alone
    "beta",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "activation_checkpointing",
    "logging_steps",
    "max_steps",
    "save_strategy",
)


def test_anyones_data_gets_trls_defaults_and_the_demo_its_own_recipe(make_cfg, tmp_path):
    from trl import DPOConfig

    trl = DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)  # TRL's bf16=True needs a GPU
    for anneal in ("dpo", "lora"):
        real = make_cfg("+merge=slerp", "data=custom", "data.path=prefs.jsonl", f"anneal={anneal}").anneal.trainer
        for name in TRL_DEFAULTS:
            if not (anneal == "lora" and name == "learning_rate"):  # LoRA's step: lora.yaml says why
                assert real[name] == getattr(trl, name), name
        assert real.num_train_epochs == 1 and real.learning_rate == (1e-6 if anneal == "dpo" else 5e-6)
        assert (real.loss_type, real.loss_weights) == (["sigmoid", "sft"], [1.0, 0.2]) and trl.loss_type == ["sigmoid"]
    real_eval = make_cfg("+merge=slerp", "data=custom", "data.path=prefs.jsonl").eval
    assert (real_eval.batch_size, real_eval.max_new_tokens) == (8, 128)  # a chat model's answers, long sequences
    demo_eval = make_cfg("+merge=slerp").eval
    assert (demo_eval.batch_size, demo_eval.max_new_tokens) == (64, 8)
    demo = make_cfg("+merge=slerp").anneal.trainer  # the README's command: the demo's recipe, as before
    assert (demo.learning_rate, demo.beta, demo.max_length, demo.max_steps, demo.seed) == (3e-4, 0.3, 64, 1250, 0)
    assert not demo.activation_checkpointing and demo.lr_scheduler_type == "cosine"
    assert make_cfg("+merge=slerp", "anneal=lora").anneal.trainer.learning_rate == 1e-3
    override = make_cfg("+merge=slerp", "anneal.trainer.learning_rate=1e-5").anneal.trainer  # the user's word wins
    assert override.learning_rate == 1e-5 and override.max_length == 64


def test_other_parents_on_the_demos_pairs_are_refused_naming_the_data_to_give(cli, tiny, make_cfg):
    result, run_dir = cli("+merge=slerp", *tiny.models, *SHORT)  # no data=: the demo's would be used
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "data=custom data.path=" in message and "data.with_other_models=true" in message
    assert not (run_dir / "merge").exists()  # refused before anything ran
    stages = ["merge", "anneal"]
    allowed = make_cfg("+merge=slerp", *tiny.models, "data.with_other_models=true")
    assert check_data_fits_models(allowed, stages, merge_inputs(allowed, stages, run_dir)) is None
    refused = make_cfg("+merge=slerp", *tiny.models)
    with pytest.raises(UserError):
        check_data_fits_models(refused, stages, merge_inputs(refused, stages, run_dir))
    assert check_data_fits_models(refused, ["merge"], merge_inputs(refused, ["merge"], run_dir)) is None
    # the models the merge config names decide, not the `models` group: the demo's group, another model in the merge
    mixed = make_cfg("+merge=slerp", "merge.models.1.model=" + str(tiny["add"]))
    assert str(tiny["add"]) in merge_inputs(mixed, stages, run_dir)
    with pytest.raises(UserError, match="add"):
        check_data_fits_models(mixed, stages, merge_inputs(mixed, stages, run_dir))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_frozen_weights_load_straight_into_bf16_with_the_numbers_of_a_float32_load(stored, tiny, tmp_path):
    """A bf16 checkpoint's Linear weights are read as bf16 (no float32 copy), the rest upcast: parameters, buffers
    and logits under autocast equal a float32 load followed by the cast the stage made before."""
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=stored).save_pretrained(folder)
    for file in tiny["add"].glob("tok*"):
        shutil.copy(file, folder)
    assert models.stored_dtype(folder) == {torch.bfloat16: "BF16", torch.float32: "F32"}[stored]
    before = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).requires_grad_(False)
    perf.frozen_linears_to_bf16(before)
    after = weights.load_causal_lm(folder, "bfloat16")
    expected = dict(before.named_parameters())
    for name, param in after.named_parameters():
        assert param.dtype == expected[name].dtype and torch.equal(param, expected[name]), name
    assert {p.dtype for n, p in after.named_parameters() if "proj" in n} == {torch.bfloat16}
    assert after.model.norm.weight.dtype == torch.float32
    ids = torch.randint(0, 90, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(before(ids).logits, after(ids).logits)
    assert all(p.dtype == torch.float32 for p in weights.load_causal_lm(folder).parameters())


def test_the_memory_plan_is_recorded_and_one_that_cannot_fit_is_refused(cli, tiny):
    result, run_dir = cli("+merge=slerp", *tiny.overrides, "pipeline.stages=[merge,anneal]")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = manifest.load(run_dir)["stages"]["anneal"]["memory_plan"]
    assert plan["fits"] and plan["device"] == "cpu" and plan["total"] > plan["weights"] > 0
    assert plan["settings"]["mode"] == "full" and plan["settings"]["batch_size"] == 4
    # 2 x 10^6 sequences of 10^5 tokens: no machine holds their logits
    result, run_dir = cli(
        "+merge=slerp",
        *tiny.overrides,
        "anneal.trainer.per_device_train_batch_size=1000000",
        "anneal.trainer.max_length=100000",
        run_dir=run_dir.parent / "huge",
    )
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "would not fit in memory" in message and "anneal.memory_check=false" in message
    assert "per_device_train_batch_size=500000" in message and "Traceback" not in message
    stages = manifest.load(run_dir)["stages"]
    assert stages["anneal"]["status"] == "failed" and not (run_dir / "anneal" / "model").exists()


def test_qlora_where_it_cannot_run_is_a_clear_message(cli, tiny):
    result, run_dir = cli("+merge=slerp", *tiny.overrides, "anneal=qlora")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "pip install 'merge-anneal[qlora]'" in message
    elif not torch.cuda.is_available():
        assert "needs a CUDA GPU" in message
    assert "anneal=lora" in message and not (run_dir / "manifest.json").exists()  # refused before the first stage


def test_qlora_composes_bitsandbytes_own_fields(make_cfg):
    from transformers import BitsAndBytesConfig

    anneal = AnnealSettings.of(
        make_cfg("+merge=slerp", "data=custom", "data.path=p.jsonl", "anneal=qlora").anneal, "anneal"
    )
    fields = dict(anneal.quantization)
    fields["bnb_4bit_compute_dtype"] = getattr(torch, fields["bnb_4bit_compute_dtype"])
    config = BitsAndBytesConfig(**fields)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and anneal.peft["r"] == 16
    assert perf.decide_precision(anneal, 10**9, cuda=True).frozen_linear_weights == "nf4"
    assert json.dumps(dict(anneal.quantization))
