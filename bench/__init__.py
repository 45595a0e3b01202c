"""Side-by-side benchmarks: lmadapt against HF Trainer + peft on the same machine and data."""
