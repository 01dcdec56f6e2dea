"""Tabulate the fault-injection suite's figures: `python tests/shared/fault_table.py <pytest session
folder>/fault-injection.jsonl` (tests/shared/test_fault_injection.py writes one line per point)."""

import json
import sys
from collections import Counter
from pathlib import Path


def main(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    checks = [
        "killed_where_it_says",
        "done",
        "merge_bytes",
        "annealed",
        "metrics",
        "released",
        "no_half_written_cache",
        "no_temporaries",
    ]

    print(
        f"{len(rows)} points, {sum(r['killed'] for r in rows)} killed before finishing, "
        f"{sum(bool(r['resumed_from']) for r in rows)} resumed training from a checkpoint"
    )
    print("  landed: " + ", ".join(f"{k} {v}" for k, v in Counter(r["landed"] for r in rows).items()))
    for check in checks:
        print(f"  {check}: {sum(r[check] for r in rows)}/{len(rows)}")
    for r in rows:
        state = ",".join(f"{k}={v}" for k, v in r["at_kill"].items() if v)
        print(
            f"  {r['point']:<22} landed={r['landed']:<10} killed={r['killed']!s:<5} at_kill[{state}] "
            f"resumed_from={r['resumed_from']}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
