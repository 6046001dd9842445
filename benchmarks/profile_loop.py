"""Where deepplain's training step spends the time that a hand-written loop does not: cProfile of one
``framework_overhead.py`` run (deepplain's loop and the hand-written one alternating step by step, the same model,
batches and optimizer): the functions with the most own time, and the hand-written steps' share.

    python benchmarks/profile_loop.py            # 20-layer PlainNet MLP (512 units), MNIST shapes, 300 steps
    python benchmarks/profile_loop.py --full     # VAN-26 on CIFAR-10 shapes, 30 steps
    python benchmarks/profile_loop.py --top 30
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time

from _util import machine
from framework_overhead import WARMUP, paired


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    quick, steps = not args.full, 30 if args.full else 300
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        paired(quick, 20, tmp)  # warm-up: imports, allocator
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        ours, hand = paired(quick, steps, tmp)
        profiler.disable()
        seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler, stream=io.StringIO())
    hand_seconds = next(v[3] for k, v in stats.stats.items() if k[2] == "step" and "framework_overhead" in k[0])
    print(f"deepplain {ours:.2f} steps/s, hand-written {hand:.2f} steps/s (under the profiler); {seconds:.2f} s in "
          f"all, of which the hand-written steps {hand_seconds:.2f} s ({steps + WARMUP} steps each)")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


if __name__ == "__main__":
    main()
