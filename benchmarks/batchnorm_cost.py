"""The cost of deepplain's batch norm (running variance = the biased batch variance) against nn.BatchNorm1d, on
the forward and backward of the 100-layer PlainNet MLP (300 units, batch 128): the two alternate step by step; a pair is ``--steps`` of each.

    python benchmarks/batchnorm_cost.py            # 5 pairs of 50 steps
    python benchmarks/batchnorm_cost.py --pairs 3

Ends with ``batchnorm_cost_ratio=<ours / nn.BatchNorm1d>`` (the median of the pairs).
"""
from __future__ import annotations

import argparse
import statistics
import time

from _util import machine


def model(norm_cls):
    import torch
    from torch import nn
    torch.manual_seed(0)
    layers = []
    for i in range(100):
        layers += [nn.Linear(256 if i == 0 else 300, 300), norm_cls(300), nn.LeakyReLU(0.3)]
    return nn.Sequential(*layers, nn.Linear(300, 10))


def step_seconds(net, x, y) -> float:
    import torch.nn.functional as F
    start = time.perf_counter()
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    import torch
    from torch import nn

    from deepplain.layers import BatchNorm1d
    print(f"machine: {machine()}")
    theirs, ours = model(nn.BatchNorm1d), model(BatchNorm1d)
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    for _ in range(5):  # warm-up
        step_seconds(theirs, x, y), step_seconds(ours, x, y)
    ratios = []
    for i in range(args.pairs):
        # the two alternate step by step, so that the machine's drift falls on both alike
        a = b = 0.0
        for k in range(args.steps):
            if k % 2:
                a += step_seconds(theirs, x, y)
                b += step_seconds(ours, x, y)
            else:
                b += step_seconds(ours, x, y)
                a += step_seconds(theirs, x, y)
        ratios.append(b / a)
        print(f"pair {i + 1}: nn.BatchNorm1d {1000 * a / args.steps:.2f} ms/step, deepplain "
              f"{1000 * b / args.steps:.2f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
    print(f"batchnorm_cost_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
