"""jacfd's benchmarks: ``python -m bench [--quick] [--only NAME ...] [--no-compile]``.

``suite`` (the main tables: jacfd against torch.func and against its limit,
peak memory, chunk sizes), ``strategies`` and ``second``; a full run writes
``docs/benchmarks.md`` and ``docs/img/benchmarks.png``.

Every table reports medians from ``torch.utils.benchmark`` (warm runs only, one
thread) and ratios to baselines measured in the same run, because the machines
are shared and absolute times are noisy.
"""
