"""HTTP serving of finished runs: `lmadapt serve RUN_DIR ...` (needs the `serve` extra)."""
