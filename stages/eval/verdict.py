"""One verdict from the evidence: did the annealed model keep each parent's skills, and are its answers better than
the merge's, not just longer?

- capabilities: `kept` when the worst parent's retention (benchmarks, chance-corrected) has its 95 % lower bound at
  or above `eval.verdict.retention_threshold`, `lost` when its upper bound is below it, else `inconclusive`;
  `not_measured` without benchmarks on which a parent beats chance.
- answers: `better` when the win rate against the merge and its length-controlled value both have their lower
  bound above 1/2, `longer_not_better` when only the raw one does, `worse` when the raw upper bound is below 1/2,
  else `no_difference`; `not_measured` without a reward.
And one plain sentence with the numbers, which opens report.md and the model card.
"""

CAPABILITIES = ("kept", "lost", "inconclusive", "not_measured")
ANSWERS = ("better", "longer_not_better", "worse", "no_difference", "not_measured")


def capabilities(retention: dict | None, threshold: float) -> str:
    worst = (retention or {}).get("ci95", {}).get("worst")
    if worst is None:
        return "not_measured"
    low, high = worst
    return "kept" if low >= threshold else "lost" if high < threshold else "inconclusive"


def answers(versus_merged: dict | None) -> str:
    if versus_merged is None:
        return "not_measured"
    raw_low, raw_high = versus_merged["win_rate_ci95"]
    controlled_low = versus_merged["length_controlled_ci95"][0]
    if raw_low > 0.5:
        return "better" if controlled_low > 0.5 else "longer_not_better"
    return "worse" if raw_high < 0.5 else "no_difference"


def decide(retention: dict | None, win_rate: dict | None, threshold: float) -> dict:
    """metrics.json `verdict` for the annealed model: the two answers, whether to ship, and the sentence."""
    versus = (win_rate or {}).get("vs", {}).get("merged")
    kept, better = capabilities(retention, threshold), answers(versus)
    return {
        "capabilities": kept,
        "answers": better,
        "ship": kept == "kept" and better == "better",
        "retention_threshold": threshold,
        "sentence": sentence(kept, better, retention, versus, threshold),
    }


def interval(value: float, ci) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def sentence(kept: str, better: str, retention: dict | None, versus: dict | None, threshold: float) -> str:
    if kept == "not_measured":
        skills = "whether it kept each parent's skills was not measured (no benchmark on which a parent beats chance)"
    else:
        worst = interval(retention["value"]["worst"], retention["ci95"]["worst"])
        skills = {
            "kept": "it kept each parent's skills",
            "lost": "it lost part of a parent's skills",
            "inconclusive": "whether it kept each parent's skills is not settled",
        }[kept]
        skills += f" (worst parent's retention {worst}, {threshold:g} needed)"
    if better == "not_measured":
        answer = "whether its answers are better was not measured (no eval.win_rate.reward)"
    else:
        numbers = (
            f"win rate against the merge {interval(versus['win_rate'], versus['win_rate_ci95'])}, "
            f"length-controlled {interval(versus['length_controlled'], versus['length_controlled_ci95'])}, "
            f"{versus['n']} prompts"
        )
        answer = {
            "better": "its answers are better than the merge's, not just longer",
            "longer_not_better": "its answers win against the merge's only by being longer",
            "worse": "its answers are worse than the merge's",
            "no_difference": "its answers are no better than the merge's",
        }[better] + f" ({numbers})"
    ship = kept == "kept" and better == "better"
    return f"The annealed model: {skills}; {answer}. {'Ship it.' if ship else 'Not ready to ship on this evidence.'}"
