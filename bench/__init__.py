"""Benchmarks (not tests): each prints JSON and measures the peer (transformers + PEFT) in the same run."""
