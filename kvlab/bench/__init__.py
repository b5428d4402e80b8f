"""Benchmarks: baselines (Hugging Face) and runners whose results land in data/bench/."""
