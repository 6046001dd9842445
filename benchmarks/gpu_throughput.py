"""Training images per second on a GPU for VAN-26, DiracNet-28-10 and the 50-layer conv PlainNet on
CIFAR-10 shapes (batch 128): fp32 eager against bf16 autocast + channels_last, and with
torch.compile on top; peak GPU memory of each. Without a GPU it says so and exits 0.

    python benchmarks/gpu_throughput.py           # 30 timed steps per setting
    python benchmarks/gpu_throughput.py --quick   # 10 timed steps per setting

Ends with ``van26_bf16_channels_last_speedup=<ratio>`` (images/s of bf16 + channels_last over fp32 eager).
"""
from __future__ import annotations

import argparse
import time

from _util import machine

MODELS = [("VAN-26", "van", 26, {}), ("DiracNet-28-10", "dirac", 28, {"width": 10}),
          ("PlainNet conv-50", "plain", 50, {"layout": "oyedotun-50", "activation": "lrelu"})]


def throughput(name, depth, options, mode: str, steps: int, batch: int = 128) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from deepplain import build_model
    torch.manual_seed(0)
    model = build_model(name, depth, arch="conv", input_shape=(3, 32, 32), num_classes=10, **options).cuda()
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    bf16 = mode != "fp32"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step_model = torch.compile(model) if mode == "bf16+cl+compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _ in range(5 if mode != "bf16+cl+compile" else 15):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return steps * batch / seconds, torch.cuda.max_memory_allocated() / 2 ** 30


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    import torch
    print(f"machine: {machine()}")
    if not torch.cuda.is_available():
        print("no GPU: this benchmark needs CUDA; nothing measured")
        return
    steps = 10 if args.quick else 30
    modes = ["fp32", "bf16+cl"] + ([] if args.no_compile else ["bf16+cl+compile"])
    van_ratio = None
    for label, name, depth, options in MODELS:
        results = {mode: throughput(name, depth, options, mode, steps) for mode in modes}
        base = results["fp32"][0]
        for mode, (ips, mem) in results.items():
            print(f"  {label:<17} {mode:<16} {ips:>9,.0f} img/s  x{ips / base:.2f}  peak {mem:.2f} GiB")
        if name == "van":
            van_ratio = results["bf16+cl"][0] / base
    print(f"van26_bf16_channels_last_speedup={van_ratio:.2f}")


if __name__ == "__main__":
    main()
