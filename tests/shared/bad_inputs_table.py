"""Tabulate the bad-input suite's cases: `python tests/shared/bad_inputs_table.py <pytest session
folder>/bad-inputs.jsonl` (tests/shared/test_bad_inputs.py writes one line per case): exit code, seconds, message."""

import json
import sys
from pathlib import Path


def main(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    print("| case | exit | seconds | message |\n|---|---|---|---|")
    for r in rows:
        message = r["message"].removeprefix("merge-anneal: error: ").replace("|", "\\|")
        print(
            f"| {r['case']} | {r['exit']} | {r['seconds']:.1f} | {message[:160]}{'...' if len(message) > 160 else ''} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
