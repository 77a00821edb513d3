"""jacfd's benchmarks: ``python -m bench [--quick] [--only NAME]``.

Every table reports medians from ``torch.utils.benchmark`` (warm runs only, one
thread) and ratios to baselines measured in the same run, because the machines
are shared and absolute times are noisy.
"""
