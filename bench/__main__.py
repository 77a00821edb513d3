"""``python -m bench [--quick]``: print the benchmark tables as markdown."""

from __future__ import annotations

import argparse
import platform

import torch

from . import second, strategies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    options = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads={torch.get_num_threads()}{', quick' if options.quick else ''}\n"
    )
    for section in (strategies, second):
        print(section.report(options.quick), end="\n\n")


if __name__ == "__main__":
    main()
