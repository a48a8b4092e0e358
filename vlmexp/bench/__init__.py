"""`exp bench`: speed of the project's training and prediction path against the tutorial recipe.

`vlmexp.bench.run.run_bench("train", "qwen2.5-vl-3b")` builds a real-shape model with random weights
(no hub), runs the reference recipe and the project's path in one process and returns samples/s,
tokens/s, MFU and peak memory of both, plus their ratio. See docs/performance.md for measured figures.
"""
