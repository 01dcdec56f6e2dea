"""python -m pipeline.demo [cache_dir]: build the demo (if missing) and print where it is."""

import sys

from pipeline.demo import ensure_demo

print(ensure_demo(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/merge-anneal"))
