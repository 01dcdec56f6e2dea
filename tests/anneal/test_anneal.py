"""The anneal stage: DPO on the merged model, an unmerged parent as the precomputed reference.

Plumbing runs on the tiny random parents (fast tier); the default budget's claims on the README's demo run
(`slow`). The performance switches are tested in test_perf.py."""

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainerCallback

from conftest import (
    ONE_THREAD,
    SHORT,
    TEST_CACHE,
    run_in_process,
    stop_at_first_checkpoint,
    wait_until_stopped,
    write_jsonl,
)
from pipeline import UserError, manifest, models, preferences, records
from pipeline.app import run_pipeline
from pipeline.settings import CachePolicy, DataSettings
from stages import anneal
from stages.anneal import perf, references, training
from stages.anneal.reference_pass import Scoring, score_with_reference
from stages.anneal.settings import AnnealSettings


def settings(cfg) -> AnnealSettings:
    return AnnealSettings.of(cfg.anneal, "anneal")


def data(cfg) -> DataSettings:
    return DataSettings.of(cfg.data, "data")


def reference_pass(cfg, tokenizer, args, precision, folder: Path, reference_dir, pairs, pack=False):
    """The stage's reference pass alone, in `folder`."""
    switches = settings(cfg).perf.model_copy(update={"pack_rows": pack})
    scoring = Scoring(
        tokenizer, args, precision, CachePolicy.of_pipeline(cfg.pipeline), switches, folder, PartialState()
    )
    return score_with_reference(scoring, str(reference_dir), "fingerprint", pairs)


def completion_logps(model, tokenizer, prompts, completions) -> torch.Tensor:
    """Sum of log p(completion + EOS | prompt), computed directly with transformers (no TRL)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        ids = tokenizer(prompt + completion + tokenizer.eos_token).input_ids
        start = len(tokenizer(prompt).input_ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        out.append(sum(logp[i - 1, ids[i]] for i in range(start, len(ids))))
    return torch.tensor(out)


@pytest.fixture(scope="module")
def default_run(readme_run) -> Path:
    """The README's command, `python -m pipeline +merge=slerp`, with the default anneal budget."""
    return readme_run[0]


@pytest.mark.slow
def test_default_run_output_loads_and_records_everything(default_run, demo_path):
    entry = manifest.load(default_run)["stages"]["anneal"]
    assert entry["status"] == "done"
    model_dir = Path(entry["outputs"]["model"])
    assert model_dir == default_run.resolve() / "anneal" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.dtype == torch.float32 and tokenizer.chat_template
    assert list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin"))
    # the reference: slerp's base_model, the unmerged `add` parent; never the merged model
    assert entry["inputs"]["reference"] == str(demo_path / "add")
    assert entry["reference_fingerprint"] == models.fingerprint(demo_path / "add")
    assert entry["inputs"]["reference_source"] == {"path": str(demo_path / "add"), "hub_id": None, "revision": None}
    assert entry["precision"]["master_weights"] == "float32"
    assert entry["reference_batch_size"] == 32
    assert entry["cache"]["reference_logps"] in ("hit", "miss")
    assert entry["data"]["train_pairs"] == 4000 and entry["data"]["heldout_pairs"] == 300
    assert entry["data"]["dropped"]["train"] == {"empty": 0, "chosen_equals_rejected": 0, "prompt_too_long": 0}
    # the merge check before the anneal: the SLERP merge scores far below its parents on held-out answers (each
    # parent is poor at the other's skill), so it passes
    check = entry["merge_check"]
    assert check["texts"] == 64 and set(check["perplexity"]) == {"merged", "parent:add", "parent:reverse"}
    assert not check["flagged"] and check["ratio"] < 1


@pytest.mark.slow
def test_training_log_and_it_works(default_run):
    """On the demo with the default budget, training rewards/accuracies ends above 0.9 (the mean of the last five
    logs, 800 pairs: one log's 160 pairs moved between 0.89 and 0.97 on one machine)."""
    rows = [
        json.loads(line)
        for line in Path(manifest.load(default_run)["stages"]["anneal"]["outputs"]["metrics"]).read_text().splitlines()
    ]
    steps = [r for r in rows if "rewards/accuracies" in r]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in steps[-1]
    assert steps[-1]["step"] == 1250
    assert sum(s["rewards/accuracies"] for s in steps[-5:]) / 5 > 0.9, steps[-5:]
    assert steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.slow
def test_reference_logps_are_the_parents_row_by_row(default_run, demo_path):
    entry = manifest.load(default_run)["stages"]["anneal"]
    store = load_dataset("parquet", data_files=entry["outputs"]["reference_logps"], split="train")
    assert {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"} <= set(store.column_names)
    rows = store.select(range(0, len(store), 97))  # train and held-out rows
    tokenizer = AutoTokenizer.from_pretrained(demo_path / "add")
    parent = AutoModelForCausalLM.from_pretrained(demo_path / "add", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(Path(default_run) / "merge" / "model", dtype=torch.float32)
    for column, completions in (("ref_chosen_logps", rows["chosen"]), ("ref_rejected_logps", rows["rejected"])):
        stored = torch.tensor(rows[column])
        from_parent = completion_logps(parent, tokenizer, rows["prompt"], completions)
        from_merged = completion_logps(merged, tokenizer, rows["prompt"], completions)
        torch.testing.assert_close(stored, from_parent, atol=1e-3, rtol=1e-4)
        assert (stored - from_merged).abs().max() > 0.1


def test_reference_pass_under_autocast_equals_trls_with_a_float32_reference(make_short_cfg, tmp_path, tiny):
    """Under bf16 autocast the reference's Linear weights are cast to bf16 once, not at every forward: the
    log-probs are bit-identical to TRL's own precompute with the float32 reference."""
    import datasets
    from trl import DPOTrainer

    cfg = make_short_cfg("+merge=slerp", "anneal.trainer.bf16=true", "anneal.trainer.precompute_ref_batch_size=8")
    tokenizer = AutoTokenizer.from_pretrained(tiny["add"])
    precision = perf.decide_precision(settings(cfg), n_params=10**6, cuda=False)
    args = training.dpo_config(settings(cfg), tmp_path / "ckpt", precision)
    assert args.bf16 and args.precompute_ref_batch_size == 8  # set by the user: kept
    assert precision.reference_linear_weights == "bfloat16"
    pairs, _ = preferences.load_preferences(data(cfg))
    pairs = {"train": pairs["train"].select(range(40)), "heldout": pairs["heldout"].select(range(8))}
    scored = reference_pass(cfg, tokenizer, args, precision, tmp_path, tiny["add"], pairs)
    datasets.disable_caching()
    try:
        with perf.known_model_hash("fingerprint-fp32", True):
            trl_own = DPOTrainer(
                model=AutoModelForCausalLM.from_pretrained(tiny["add"], dtype=torch.float32),
                args=args,
                train_dataset=pairs["train"],
                eval_dataset=pairs["heldout"],
                processing_class=tokenizer,
            )
    finally:
        datasets.enable_caching()
    for split, theirs in (("train", trl_own.train_dataset), ("heldout", trl_own.eval_dataset)):
        for column in preferences.REF_COLUMNS:
            assert scored[split][column][:] == theirs[column][:], (split, column)
    # anneal.perf.pack_rows: the same pass with each batch's rows packed, equal up to float rounding
    packed = reference_pass(cfg, tokenizer, args, precision, tmp_path, tiny["add"], pairs, pack=True)
    for split in scored:
        for column in preferences.REF_COLUMNS:
            assert packed[split][column][:] == pytest.approx(scored[split][column][:], rel=1e-3, abs=1e-3)


def dpo_config(anneal_cfg, output_dir):
    anneal_settings = AnnealSettings.of(anneal_cfg, "anneal")
    return training.dpo_config(
        anneal_settings, output_dir, perf.decide_precision(anneal_settings, n_params=10**6, cuda=False)
    )


def test_reference_batch_size_fills_a_token_budget(make_short_cfg, tmp_path):
    assert perf.reference_batch_size(16, 64) == 32  # the demo: 32 pairs x 2 x 64 tokens = 4096
    assert perf.reference_batch_size(4, 134) == 15
    assert perf.reference_batch_size(8, 2048) == 8  # long sequences: the training batch
    assert perf.reference_batch_size(2, None) == 2  # TRL's max_length=None: read as 1024
    assert perf.reference_batch_size(4, 64, tokens=1024) == 8
    args = dpo_config(
        make_short_cfg(
            "+merge=slerp", "anneal.trainer.per_device_train_batch_size=16", "anneal.trainer.max_length=64"
        ).anneal,
        tmp_path,
    )
    assert args.precompute_ref_batch_size == 32
    off = make_short_cfg("+merge=slerp", "anneal.perf.reference_pass_tokens=null").anneal
    assert dpo_config(off, tmp_path).precompute_ref_batch_size is None  # TRL's own choice


def test_reference_is_released_before_the_policy_trains(make_short_cfg, tmp_path, tiny):
    cfg = make_short_cfg("+merge=slerp")
    run_pipeline(make_short_cfg("+merge=slerp", "pipeline.stages=[merge]"), tmp_path)
    merged_dir = Path(records.load(tmp_path, records.MergeRecord).outputs.model)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    precision = perf.decide_precision(settings(cfg), models.count_parameters(merged_dir), cuda=False)
    args = training.dpo_config(settings(cfg), tmp_path / "ckpt", precision)
    pairs, _ = preferences.load_preferences(data(cfg))
    with perf.gc_skips_existing_objects(True):  # as in the stage
        scored = reference_pass(cfg, tokenizer, args, precision, tmp_path, tiny["add"], pairs)
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]

    resident = []

    class CountModels(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            resident.append(sum(isinstance(o, PreTrainedModel) and hasattr(o, "lm_head") for o in gc.get_objects()))

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    trainer = training.make_trainer(
        model, tokenizer, args, scored["train"], settings(cfg), tmp_path, perf.known_model_hash("fingerprint", True)
    )
    trainer.add_callback(CountModels())
    trainer.train()
    assert trainer.ref_model is None
    assert resident and set(resident) == {1}  # one causal LM alive: the policy alone


def test_length_grouped_batches_pad_less_and_cover_every_pair(make_short_cfg, tmp_path, tiny):
    """anneal.trainer.train_sampling_strategy: group_by_length (an option; the default is TRL's random) against
    random batches, on pairs of mixed lengths: the same pairs once each per epoch, far less padding. Rows are TRL's
    own batches."""
    import random

    from datasets import Dataset

    rng = random.Random(0)
    rows = [
        {
            "prompt": "12+34=" * rng.choice([1, 1, 1, 8]),
            "chosen": "9" * rng.randint(1, 24),
            "rejected": "8" * rng.randint(1, 24),
            "ref_chosen_logps": -1.0,
            "ref_rejected_logps": -2.0,
        }
        for _ in range(96)
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny["add"])
    padding, row_lengths = {}, {}
    for strategy in ("random", "group_by_length"):
        cfg = make_short_cfg("+merge=slerp", f"anneal.trainer.train_sampling_strategy={strategy}")
        model = AutoModelForCausalLM.from_pretrained(tiny["add"])
        trainer = training.make_trainer(
            model,
            tokenizer,
            dpo_config(cfg.anneal, tmp_path / strategy),
            Dataset.from_list(rows),
            settings(cfg),
            tmp_path,
            perf.known_model_hash("x", True),
        )
        batches = list(trainer.get_train_dataloader())
        masks = [b["attention_mask"] for b in batches]
        padding[strategy] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        # each pair's chosen row (the first half of a batch), by its real length: every pair exactly once
        row_lengths[strategy] = sorted(int(n) for m in masks for n in m[: len(m) // 2].sum(dim=1))
    assert row_lengths["group_by_length"] == row_lengths["random"] and len(row_lengths["random"]) == len(rows)
    assert padding["group_by_length"] < padding["random"] / 2, padding


def test_reference_logps_shared_across_merges(make_short_cfg, tmp_path, no_network):
    """A sweep over merge settings with the same reference and data computes the reference pass once; local
    parents and local data ask no host anything."""
    first = run_pipeline(make_short_cfg("+merge=slerp", "merge.parameters.t=0.7"), tmp_path / "a")["stages"]
    entry = run_pipeline(make_short_cfg("+merge=slerp", "merge.parameters.t=0.3"), tmp_path / "b")["stages"]
    assert entry["anneal"]["reference_fingerprint"] == first["anneal"]["reference_fingerprint"]
    assert entry["anneal"]["cache"]["reference_logps"] == "hit"  # another merge, the same reference pass
    off = run_pipeline(make_short_cfg("+merge=slerp", "pipeline.cache=false"), tmp_path / "off")["stages"]["anneal"]
    assert off["cache"]["reference_logps"] == "miss"
    assert no_network == []


@pytest.mark.parametrize("loss", ["[sigmoid]", "[ipo]", "[apo_zero]", "[sigmoid,sft]", "simpo", "orpo"])
def test_every_loss_type_trains(loss, make_short_cfg, tmp_path):
    """DPO's loss types, and TRL's reference-free trainers (anneal.method): simpo is CPO's, orpo its own."""
    if loss.startswith("["):
        overrides = [f"anneal.trainer.loss_type={loss}"]
        overrides.append("anneal.trainer.loss_weights=[1.0,0.5]" if "," in loss else "anneal.trainer.loss_weights=null")
    else:  # orpo: through release, whose card names the method
        overrides = [f"+anneal_variant={loss}", *(["pipeline.stages=[merge,anneal,eval,release]"] * (loss == "orpo"))]
    entry = run_pipeline(make_short_cfg("+merge=slerp", *overrides), tmp_path)["stages"]
    before = load_file(Path(entry["merge"]["outputs"]["model"]) / "model.safetensors")
    after = load_file(Path(entry["anneal"]["outputs"]["model"]) / "model.safetensors")
    settings = entry["anneal"]["config"]["anneal"]
    if loss.startswith("["):
        assert settings["method"] == "dpo" and settings["trainer"]["loss_type"] == loss.strip("[]").split(",")
    else:  # the trainer TRL logged its own metrics: ORPO's odds ratio, SimPO's length-normalised margins
        assert settings["method"] == {"simpo": "cpo", "orpo": "orpo"}[loss]
        logged = [json.loads(line) for line in Path(entry["anneal"]["outputs"]["metrics"]).read_text().splitlines()]
        key = {"simpo": "rewards/margins", "orpo": "log_odds_ratio"}[loss]
        assert any(key in row for row in logged) and not any("ref_" in k for row in logged for k in row)
    if loss == "orpo":
        card = " ".join(Path(entry["release"]["outputs"]["card"]).read_text().split())
        assert "annealed with a short reference-free ORPO run" in card and "the loss did not read them" in card
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_lora_adapter_is_merged_into_the_saved_model(make_short_cfg, tmp_path, tiny):
    entry = run_pipeline(make_short_cfg("+merge=slerp", "anneal=lora"), tmp_path)["stages"]["anneal"]
    model_dir = Path(entry["outputs"]["model"])
    assert not (model_dir / "adapter_config.json").exists()
    after = load_file(model_dir / "model.safetensors")
    before = load_file(tmp_path / "merge" / "model" / "model.safetensors")
    assert set(after) == set(before)  # plain weights, no lora_A / lora_B
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert entry["inputs"]["reference"] == str(tiny["add"])  # slerp's base model
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_lora_under_bf16_autocast_keeps_frozen_weights_in_bf16_and_saves_fp32(make_short_cfg, tmp_path):
    entry = run_pipeline(
        make_short_cfg(
            "+merge=slerp", "anneal=lora", "anneal.trainer.bf16=true", "anneal.trainer.activation_checkpointing=false"
        ),  # what is saved, unrecomputed
        tmp_path,
    )["stages"]["anneal"]
    assert entry["precision"] == {
        "master_weights": "float32",
        "autocast": "bfloat16",
        "frozen_linear_weights": "bfloat16",
        "autocast_weight_cache": False,
        "reference_linear_weights": "bfloat16",
        "attention": "bfloat16",
    }
    assert entry["saved_for_backward"]["silu_recomputed"] > 0
    after = load_file(Path(entry["outputs"]["model"]) / "model.safetensors")
    before = load_file(tmp_path / "merge" / "model" / "model.safetensors")
    adapter = load_file(Path(entry["outputs"]["adapter"]) / "adapter_model.safetensors")
    config = json.loads((Path(entry["outputs"]["adapter"]) / "adapter_config.json").read_text())
    assert all(t.dtype == torch.float32 for t in [*after.values(), *adapter.values()])
    # saved = the float32 merged weights + the adapter's B @ A * alpha / r (not a bf16-rounded base)
    name = "model.layers.0.self_attn.q_proj"
    a, b = (next(v for k, v in adapter.items() if name in k and f"lora_{x}" in k) for x in "AB")
    expected = before[f"{name}.weight"] + b @ a * config["lora_alpha"] / config["r"]
    torch.testing.assert_close(after[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])
    untouched = "model.embed_tokens.weight"
    assert torch.equal(after[untouched], before[untouched])


@pytest.mark.parametrize("bf16", ["auto", "true"])
def test_bf16_merge_trains_with_fp32_master_weights(bf16, make_short_cfg, tmp_path):
    entry = run_pipeline(
        make_short_cfg("+merge=linear", "merge.dtype=bfloat16", f"anneal.trainer.bf16={bf16}"), tmp_path
    )["stages"]
    assert (
        load_file(Path(entry["merge"]["outputs"]["model"]) / "model.safetensors")["lm_head.weight"].dtype
        == torch.bfloat16
    )
    model_dir = Path(entry["anneal"]["outputs"]["model"])
    assert load_file(model_dir / "model.safetensors")["lm_head.weight"].dtype == torch.float32
    autocast = bf16 == "true"  # auto: a tiny model is too small for autocast to pay
    assert entry["anneal"]["precision"] == {
        "master_weights": "float32",
        "autocast": "bfloat16" if autocast else None,
        "frozen_linear_weights": "float32",
        "autocast_weight_cache": False if autocast else None,
        "attention": "float32",  # CPU: float32 under autocast
        "reference_linear_weights": "bfloat16" if autocast else "float32",
    }
    assert perf.FLOAT32_SDPA not in (model_dir / "config.json").read_text()


def test_reference_choices(make_short_cfg, tmp_path, tiny):
    parents, base = ["/p/add", "/p/reverse"], "/p/base"
    merged = tmp_path / "merged"
    assert references.choose_reference("auto", parents, base, merged) == ("/p/base", "base_model")
    assert references.choose_reference("auto", parents, None, merged) == ("/p/add", "parent:0")
    assert references.choose_reference("1", parents, base, merged) == ("/p/reverse", "parent:1")
    assert references.choose_reference("reverse", parents, base, merged) == ("/p/reverse", "parent:reverse")
    assert references.choose_reference("merged", parents, base, merged) == (str(merged), "merged")
    assert references.choose_reference("/elsewhere", parents, base, merged) == ("/elsewhere", "explicit")
    with pytest.raises(UserError, match="2 parents"):
        references.choose_reference("5", parents, base, merged)
    entry = run_pipeline(make_short_cfg("+merge=ties", "anneal.reference=reverse"), tmp_path)["stages"]["anneal"]
    assert entry["inputs"]["reference"] == str(tiny["reverse"])
    assert entry["inputs"]["reference_source"] == {"path": str(tiny["reverse"]), "hub_id": None, "revision": None}


# ------------------------------------------------------------------------------------------------ data


def data_cfg(make_short_cfg, path: Path, *overrides) -> DataSettings:
    return data(make_short_cfg("+merge=slerp", "data=custom", f"data.path={path}", *overrides))


PAIRS = [{"question": f"{a}+{a}=", "good": str(2 * a), "bad": str(2 * a + 1), "sys": "be exact"} for a in range(10, 60)]


def test_column_mapping_system_and_drops_are_counted(make_short_cfg, tmp_path):
    rows = PAIRS + [
        {"question": "1+1=", "good": "", "bad": "3", "sys": "x"},
        {"question": "2+2=", "good": "4", "bad": "4", "sys": "x"},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = data_cfg(
        make_short_cfg,
        path,
        "data.columns.prompt=question",
        "data.columns.chosen=good",
        "data.columns.rejected=bad",
        "data.heldout.fraction=0.2",
    )
    pairs, dropped = preferences.load_preferences(cfg)
    total = sum(len(pairs[s]) for s in pairs)
    assert total == 50
    assert sum(d["empty"] for d in dropped.values()) == 1
    assert sum(d["chosen_equals_rejected"] for d in dropped.values()) == 1
    assert set(pairs["train"].column_names) == {"prompt", "chosen", "rejected"}
    cfg = data_cfg(
        make_short_cfg,
        path,
        "data.columns.prompt=question",
        "data.columns.chosen=good",
        "data.columns.rejected=bad",
        "data.columns.system=sys",
    )
    pairs, _ = preferences.load_preferences(cfg)
    row = pairs["train"][0]
    assert row["prompt"][0] == {"role": "system", "content": "be exact"} and row["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize("fmt", ["conversational", "implicit", "parquet", "csv"])
def test_trl_formats_and_file_types_train(fmt, make_short_cfg, tmp_path):
    standard = [{"prompt": r["question"], "chosen": r["good"], "rejected": r["bad"]} for r in PAIRS]
    if fmt == "conversational":
        rows = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in standard
        ]
        path = write_jsonl(tmp_path / "conv.jsonl", rows)
    elif fmt == "implicit":
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in standard]
        path = write_jsonl(tmp_path / "implicit.jsonl", rows)
    else:
        from datasets import Dataset

        path = tmp_path / f"prefs.{fmt}"
        getattr(Dataset.from_list(standard), f"to_{fmt}")(str(path))
    cfg = make_short_cfg("+merge=slerp", "data=custom", f"data.path={path}", "data.heldout.fraction=0.2")
    entry = run_pipeline(cfg, tmp_path / "run")["stages"]["anneal"]
    assert entry["data"]["train_pairs"] == 40 and entry["data"]["heldout_pairs"] == 10


def length_limited(fmt: str, n_long: int) -> list[dict]:
    """The standard pairs, `n_long` of them with a prompt far over 32 tokens: a long prompt (standard format) or a
    long system prompt (conversational, as a chat model's template adds one)."""
    rows = []
    for i, r in enumerate(PAIRS):
        long = i < n_long
        if fmt == "standard":
            rows.append(
                {"prompt": ("9" * 80 if long else "") + r["question"], "chosen": r["good"], "rejected": r["bad"]}
            )
        else:
            system = [{"role": "system", "content": "be exact " * 10}] if long else []
            rows.append(
                {
                    "prompt": [*system, {"role": "user", "content": r["question"]}],
                    "chosen": [{"role": "assistant", "content": r["good"]}],
                    "rejected": [{"role": "assistant", "content": r["bad"]}],
                }
            )
    return rows


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_pairs_whose_prompt_fills_the_limit_are_dropped_counted_and_the_rest_train(fmt, make_short_cfg, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", length_limited(fmt, n_long=20))
    cfg = make_short_cfg(
        "+merge=slerp", "data=custom", f"data.path={path}", "data.heldout.fraction=0.2", "anneal.trainer.max_length=32"
    )
    entry = run_pipeline(cfg, tmp_path / "run")["stages"]["anneal"]
    dropped = entry["data"]["dropped"]
    assert entry["status"] == "done"
    assert dropped["train"]["prompt_too_long"] + dropped["heldout"]["prompt_too_long"] == 20
    assert entry["data"]["train_pairs"] + entry["data"]["heldout_pairs"] == 30


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_a_split_emptied_by_the_limit_is_refused_with_its_count_and_the_fix(fmt, cli, tiny, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", length_limited(fmt, n_long=len(PAIRS)))
    result, run_dir = cli(
        "+merge=slerp",
        *tiny.models,
        "data=custom",
        "eval/benchmarks=none",
        f"data.path={path}",
        "data.heldout.fraction=0.2",
        *SHORT,
        "anneal.trainer.max_length=32",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.split("merge-anneal: error:")[-1]
    assert "Every one of the 40 train pairs" in " ".join(message.split()) and "Traceback" not in message
    assert "anneal.trainer.max_length" in message
    assert manifest.load(run_dir)["stages"]["anneal"]["status"] == "failed"
    assert not (run_dir / "anneal" / "model").exists()


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (["anneal.trainer.beta=0"], "beta must be positive"),
        (["anneal.trainer.learning_rate=-1e-5"], "learning_rate must be positive"),
        (["anneal.trainer.loss_type=[sigmoidd]", "anneal.trainer.loss_weights=null"], "Unknown DPO loss type"),
        (["anneal.trainer.loss_type=[nca_pair]"], "loss_weights has 2 weights ([1.0, 0.2]) for 1 loss type"),
        (["+anneal.trainer.max_prompt_length=10"], "DPOConfig rejected"),
        (["+anneal.trainer.output_dir=/tmp/x"], "set by merge-anneal"),
        (["anneal.method=kto"], "anneal.method: Input should be 'dpo', 'cpo' or 'orpo' (got 'kto')"),
        (["anneal.reference_combine=median"], "anneal.reference_combine: Input should be 'mean', 'max' or 'route'"),
        (["+anneal.method_args.beta=2.0"], "anneal.method=dpo takes its fields"),
        (["anneal.method=cpo", "+anneal.method_args.loss_type=nope"], "CPOConfig rejected"),
        (["anneal.method=orpo", "+anneal.method_args.cpo_alpha=1"], "ORPOConfig rejected"),
        (["anneal=lora", "+anneal.peft.no_such_field=1"], "LoraConfig rejected"),
        (["anneal.perf.pack_rows=maybe"], "anneal.perf.pack_rows: Input should be a valid boolean"),
        (["pipeline.merge_check.texts=-1"], "pipeline.merge_check.texts: Input should be greater than or equal to 0"),
        (["data=custom", "data.path=nope.jsonl"], "data.path=nope.jsonl is neither a file nor a hub data set id"),
        (["data=custom", "data.path=prefs.txt"], "unsupported file type '.txt'"),
    ],
    ids=lambda value: value[-1] if isinstance(value, list) else None,
)
def test_check_refuses_bad_anneal_settings_before_any_work(overrides, phrase, make_short_cfg, tmp_path, monkeypatch):
    """`anneal.check` (what the app runs before the first stage) refuses each, naming the setting and the fix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs.txt").write_text("prompt,chosen,rejected\n")
    with pytest.raises(UserError) as refused:
        anneal.check(make_short_cfg("+merge=slerp", *overrides))
    message = " ".join(str(refused.value).split())
    assert phrase in message and "Fix:" in message


def test_check_passes_the_shipped_settings_and_method_configs_take_their_fields(make_short_cfg, tmp_path):
    cfg = make_short_cfg("+merge=slerp")
    anneal.check(cfg)
    assert dpo_config(cfg.anneal, tmp_path).precompute_ref_log_probs
    precision = perf.decide_precision(settings(cfg), n_params=10**6, cuda=False)
    # a reference-free method takes the Trainer fields of anneal.trainer, and its own fields from method_args
    simpo = make_short_cfg("+merge=slerp", "+anneal_variant=simpo", "anneal.trainer.learning_rate=0.01")
    anneal.check(simpo)
    args = training.method_config(settings(simpo), dpo_config(simpo.anneal, tmp_path), precision)
    assert type(args).__name__ == "CPOConfig" and (args.loss_type, args.beta, args.cpo_alpha) == ("simpo", 2.0, 0.0)
    assert args.learning_rate == 0.01 and args.output_dir == str(tmp_path)


def test_missing_columns_and_nothing_left(cli, tmp_path, tiny):
    path = write_jsonl(tmp_path / "q.jsonl", PAIRS)
    result, run_dir = cli("+merge=slerp", *tiny.models, "data=custom", "eval/benchmarks=none", f"data.path={path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lacks column(s)" in result.stderr and "data.columns.prompt" in result.stderr
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "merge").exists()  # refused before any stage
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}] * 5)
    result, run_dir = cli(
        "+merge=slerp",
        *tiny.models,
        "data=custom",
        "eval/benchmarks=none",
        f"data.path={path}",
        "data.heldout.fraction=0.4",
        run_dir=tmp_path / "run2",
    )
    assert result.returncode == 2 and "No train preference pairs are left" in " ".join(result.stderr.split())
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "merge").exists()


def test_reference_with_another_vocabulary_is_refused(cli, tmp_path, tiny):
    other = tmp_path / "other-vocab"
    tokenizer = AutoTokenizer.from_pretrained(tiny["add"])
    tokenizer.add_tokens(["<extra>"])
    model = AutoModelForCausalLM.from_pretrained(tiny["add"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    result, run_dir = cli(
        "+merge=slerp", *tiny.overrides, "pipeline.stages=[merge,anneal]", f"anneal.reference={other}"
    )
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not share the merged model's vocabulary" in message and "anneal.reference=auto" in message
    assert manifest.load(run_dir)["stages"]["anneal"]["status"] == "failed"


# ----------------------------------------------------------------------------------------------- resume


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, shared_cache, tiny):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "+merge=slerp",
        "pipeline.stages=[merge,anneal]",
        *tiny.overrides,
        f"pipeline.cache_dir={shared_cache}",
        f"models.cache_dir={TEST_CACHE}",
        f"hydra.run.dir={run_dir}",
        "anneal.trainer.max_steps=20",
        "anneal.trainer.save_steps=10",
        "anneal.trainer.logging_steps=10",
    ]
    env = {**os.environ, **ONE_THREAD, **stop_at_first_checkpoint(tmp_path / "hook")}
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until_stopped(process)  # it stopped itself once its first checkpoint was complete: alive, mid-training
        # while it lives, the folder is its own: a second run there is refused, naming it
        second = run_in_process(*args[3:], "pipeline.resume=true", cwd=tmp_path)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert second.returncode == 2 and f"in use by another merge-anneal process (pid {process.pid}" in " ".join(
        second.stderr.split()
    )
    checkpoints = run_dir / "anneal" / "checkpoints"
    assert [c.name for c in checkpoints.glob("checkpoint-*")] == ["checkpoint-10"]
    before = manifest.load(run_dir)["stages"]
    assert before["merge"]["status"] == "done" and before["anneal"]["status"] == "running"
    assert before["anneal"]["pid"] == process.pid
    # once it is gone, the stage it left running is reported as interrupted, with the command that resumes it
    again = run_in_process(*args[3:], cwd=tmp_path)
    message = " ".join(again.stderr.split())
    assert again.returncode == 2 and "anneal stage" in message and "was interrupted" in message
    assert f"pid {process.pid}" in message and "pipeline.resume=true" in message
    assert f"hydra.run.dir={run_dir}" in message
    assert manifest.load(run_dir)["stages"] == before  # the refused runs wrote nothing

    result = run_in_process(*args[3:], "pipeline.resume=true", cwd=tmp_path)  # the CLI's entry point, here
    assert result.returncode == 0, result.stderr[-3000:]
    after = manifest.load(run_dir)["stages"]
    assert after["merge"] == before["merge"]  # the merge is not redone
    assert "merge: done in an earlier attempt" in result.stdout
    assert after["anneal"]["resumed_from"] == str(checkpoints / "checkpoint-10")
    logged = [json.loads(line)["step"] for line in (run_dir / "anneal" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [10, 20, 20]  # the first run's step 10, the resumed run's step 20 and its closing summary
