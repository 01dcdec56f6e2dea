"""Every loss type of `+sweep=anchored_losses` (TRL's bounded and anchored DPO losses) trains through the stage, on
tiny models, against the default reference and against all the parents (max)."""

import math
import re

import pytest
from omegaconf import OmegaConf

from pipeline import CONF_DIR, manifest

PRESET = OmegaConf.load(CONF_DIR / "sweep" / "anchored_losses.yaml")
LOSSES = re.findall(r"\[(\w+)\]", PRESET.hydra.sweeper.params["anneal.trainer.loss_type"])


def test_the_preset_sweeps_the_anchored_losses_against_both_references():
    assert set(LOSSES) == {
        *("apo_zero", "nca_pair", "bco_pair", "sppo_hard", "exo_pair", "robust"),
        *("ipo", "discopop", "sigmoid_norm", "aot", "sigmoid"),
    }
    assert PRESET.hydra.sweeper.params["anneal.reference"] == "auto,parents"
    assert PRESET.anneal.reference_combine == "max" and PRESET.anneal.trainer.label_smoothing > 0  # exo_pair's epsilon
    assert PRESET.anneal.trainer.loss_weights is None  # each loss alone, not the default's two weights


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_trains_through_the_stage(cli, tiny, tmp_path, loss):
    reference = ["anneal.reference=parents", "anneal.reference_combine=max"] if loss in ("apo_zero", "aot") else []
    result, run_dir = cli(
        "+merge=slerp",
        *tiny.overrides,
        "pipeline.stages=[merge,anneal]",
        f"anneal.trainer.loss_type=[{loss}]",
        "anneal.trainer.loss_weights=null",
        "+anneal.trainer.label_smoothing=0.001",
        *reference,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    anneal = manifest.load(run_dir)["stages"]["anneal"]
    assert anneal["status"] == "done" and anneal["config"]["anneal"]["trainer"]["loss_type"] == [loss]
    assert math.isfinite(anneal["final_log"]["train_loss"])
    assert (run_dir / "anneal" / "model" / "model.safetensors").is_file()
