"""One module per pipeline stage; each exposes `run(cfg, run_dir) -> dict` (its manifest entry)."""
