"""VAN's training step against ResNet's of the same shape: the Fashion-MNIST MLP-30 (width 50, BN + ReLU
pre-activation blocks, batch 128, SGD with momentum), each with its own copy of the data.

The two step alternately, one step each in turn, for ``--steps`` steps per pair, so that this VM's drift (its wall
times vary by 20-40% between runs a minute apart) falls on both alike. A VAN step is the forward and backward with
its 30 gated skips, the optimizer step and the Lagrangian update of the alphas and multipliers
(``callbacks.alpha.lagrangian_steps``, as AlphaScheduler does it each step, with the check for the step every skip
is gone); a ResNet step the same without gates. Lightning's loop, the same for both, is left out: it would only
lower the ratio. Reports each pair's ratio of median step times and the median of the pairs; then, from 2,000
single-gate micro-steps, what one gated skip costs against a plain skip (forward and backward).

``--conv``: the product's main network instead, VAN-26 on CIFAR-10 shapes (batch 64), against the same network
with its 12 gates removed (``out + skip``: ResNet's skip on VAN's blocks; the registry's ResNet-26 has other
blocks), 3 pairs of 20 steps by default.

    python benchmarks/van_vs_resnet.py             # 5 pairs of 200 steps each
    python benchmarks/van_vs_resnet.py --pairs 3
    python benchmarks/van_vs_resnet.py --conv

Ends with ``van_resnet_step_ratio=<VAN / ResNet>``.
"""
from __future__ import annotations

import argparse
import statistics
import time

from _util import machine


def stepper(model_name: str, conv: bool = False):
    """A function that runs one training step of ``model_name`` and returns its wall seconds; with ``conv``, of
    VAN-26 on CIFAR-10 shapes, its gates removed unless ``model_name`` is ``van``."""
    import torch
    import torch.nn.functional as F

    from deepplain import build_model
    from deepplain.callbacks.alpha import calibrated_step_sizes, lagrangian_steps
    from deepplain.callbacks.probing import skip_gates
    from deepplain.models.residual import ResidualBlock
    from deepplain.optim import make_optimizer
    torch.manual_seed(0)
    if conv:
        model, shape, batch = build_model("van", 26, arch="conv", input_shape=(3, 32, 32), num_classes=10), \
            (3, 32, 32), 64
        if model_name != "van":
            for block in model.modules():
                if isinstance(block, ResidualBlock):
                    block.gate = None
    else:
        model, shape, batch = build_model(model_name, 30, arch="mlp", input_shape=(1, 28, 28), num_classes=10,
                                          width=50), (1, 28, 28), 128
    model.train()
    optimizer = make_optimizer(model, "sgd", 0.001, 0.9, False, 0.0)
    gates = [gate for _, gate in skip_gates(model)]
    eta_alpha, eta_lambda = calibrated_step_sizes(17_100, 0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(8)]
    state = {"i": 0}

    def step() -> float:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if gates:
            grads = [gate.alpha.grad for gate in gates]
            for gate in gates:
                gate.alpha.grad = None
            alphas = lagrangian_steps(gates, grads, eta_alpha, eta_lambda, True)
            alphas.min() >= 1  # noqa: B015 (the scheduler's check for the step every skip is gone)
        optimizer.step()
        return time.perf_counter() - start
    return step


def gate_micro(repeats: int = 2000) -> tuple[float, float]:
    """Median microseconds of forward+backward through one gated skip and one plain skip (128 x 50)."""
    import torch

    from deepplain.models.residual import SkipGate
    out = torch.randn(128, 50, requires_grad=True)
    skip = torch.randn(128, 50, requires_grad=True)
    gate = SkipGate(50)

    def timed(fn):
        samples = []
        for i in range(repeats + 50):
            start = time.perf_counter()
            fn().sum().backward()
            if i >= 50:
                samples.append(time.perf_counter() - start)
        return 1e6 * statistics.median(samples)
    return timed(lambda: gate.add_to(out, skip)), timed(lambda: out + skip)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv", action="store_true", help="VAN-26 on CIFAR-10 shapes, with and without its gates")
    parser.add_argument("--pairs", type=int, default=None, help="default 5 (3 with --conv)")
    parser.add_argument("--steps", type=int, default=None, help="steps per pair, default 200 (20 with --conv)")
    args = parser.parse_args()
    pairs, steps = args.pairs or (3 if args.conv else 5), args.steps or (20 if args.conv else 200)
    print(f"machine: {machine()}")
    print("VAN-26 (CIFAR-10 shapes, batch 64) against the same network without its gates" if args.conv else
          "VAN-30 against ResNet-30, MLP of width 50, Fashion-MNIST shapes, batch 128")
    ratios = []
    for i in range(pairs):
        van, resnet = stepper("van", args.conv), stepper("resnet", args.conv)
        for _ in range(3 if args.conv else 20):  # warm-up
            van(), resnet()
        times = {"van": [], "resnet": []}
        for k in range(steps):
            order = (("van", van), ("resnet", resnet)) if k % 2 == 0 else (("resnet", resnet), ("van", van))
            for name, fn in order:
                times[name].append(fn())
        v, r = statistics.median(times["van"]), statistics.median(times["resnet"])
        ratios.append(v / r)
        print(f"pair {i + 1}: VAN {1000 * v:.2f} ms/step, ResNet {1000 * r:.2f} ms/step, ratio {ratios[-1]:.3f}",
              flush=True)
    if args.conv:
        print(f"van26_gates_step_ratio={statistics.median(ratios):.3f}")
        return
    gated, plain = gate_micro()
    print(f"one skip, forward and backward (128 x 50): gated {gated:.1f} us, plain {plain:.1f} us; 30 gates add "
          f"{30 * (gated - plain) / 1000:.2f} ms a step")
    print(f"van_resnet_step_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
