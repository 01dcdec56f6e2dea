"""The demo's reward, a rule (TRL's reward-function convention: `reward(prompts, completions) -> scores`): 1 for the
exact answer (a sum, a reversed word), 0 for anything else, longer or shorter. It is what eval's win rate scores the
demo's answers with (`eval.win_rate.reward=pipeline.demo.reward:reward`); a real run names a reward model.

Not part of the demo's cache key (pipeline/demo/build.py): changing it never rebuilds the demo.
"""

from pipeline.demo.tasks import expected_answer


def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    scores = []
    for prompt, completion in zip(prompts, completions):
        try:
            scores.append(float(completion.strip() == expected_answer(prompt)))
        except ValueError:  # not one of the demo's prompts
            scores.append(0.0)
    return scores
