"""Cockpit (Schneider, Dangel & Hennig, NeurIPS 2021) against deepplain's diagnostics, on the same run.

    pip install -e ".[bench]"                 # cockpit-for-pytorch and backpack-for-pytorch
    python benchmarks/peer_cockpit.py         # 230 steps (the 4-epoch USPS run), 20 Cockpit samples, 3 repeats
    python benchmarks/peer_cockpit.py --steps 40 --samples 2 --repeats 1   # what fits in ~5 minutes on 2 cores

The 100-layer PlainNet MLP (300 units, BN + LeakyReLU 0.3, He-uniform) on USPS, batch 128, SGD 0.01 with
momentum 0.9, timed four ways, interleaved:

* a bare PyTorch loop, and the same loop with Cockpit tracking its ``economy`` configuration (Alpha,
  Distance, GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize), sampled on
  deepplain's default cadence (``--samples``, default 20, spread over the run, first and last step
  included) -> ``cockpit_overhead``, and Cockpit's cost per tracked step;
* deepplain's Lightning loop without and with its three diagnostics at their defaults
  (ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor) -> ``deepplain_overhead``.

Each tool is measured against its own bare loop, since Cockpit wraps a hand-written backward and
deepplain's callbacks need Lightning; ``lightning_vs_bare`` says what the loop itself costs. The closest
quantities are Cockpit's GradNorm / GradHist1d and our gradient flow; Cockpit has no activation-saturation
or condition-number quantity, and we have no curvature tests. If Cockpit cannot run here, the script
says why and prints ``cockpit_overhead=unavailable``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

from _util import default_diagnostics, machine, plain_mlp_module

DEPTH, WIDTH, LR = 100, 300, 0.01


def data():
    from deepplain.datamodules import USPSDataModule
    dm = USPSDataModule(batch_size=128, val_split=0.0)
    dm.setup()
    return dm


def model(torch_batch_norm: bool = False):
    """The 100-layer MLP; ``torch_batch_norm``: with nn.BatchNorm1d in place of deepplain's (BackPACK, which
    Cockpit's quantities need, extends modules by their exact class and computes no per-sample gradient for a
    subclass: the quantities then fail on its parameters)."""
    import torch
    from torch import nn

    from deepplain import build_model
    from deepplain.layers import BatchNorm1d
    torch.manual_seed(0)
    net = build_model("plain", DEPTH, arch="mlp", input_shape=(1, 16, 16), num_classes=10, width=WIDTH,
                      activation="lrelu", negative_slope=0.3, norm="bn", init="he-uniform")
    if torch_batch_norm:
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, BatchNorm1d):
                    plain = nn.BatchNorm1d(child.num_features, eps=child.eps, momentum=child.momentum)
                    plain.load_state_dict(child.state_dict())
                    setattr(parent, name, plain)
    return net


def batches(dm, steps):
    out = []
    while len(out) < steps:
        out += list(dm.train_dataloader())
    return out[:steps]


def tracking_interval(steps: int, samples: int) -> int:
    """Cockpit tracks every this many steps: ``samples`` tracked steps, the first and the last among them."""
    return max(1, -(-(steps - 1) // max(1, samples - 1)))


def bare_loop(dm, steps: int, use_cockpit: bool, samples: int = 20) -> float:
    import torch
    net = model(torch_batch_norm=use_cockpit)
    loss_fn, per_sample = torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(reduction="none")
    cockpit = None
    if use_cockpit:
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration
        net, loss_fn = extend(net), extend(loss_fn)
        schedule = schedules.linear(tracking_interval(steps, samples))
        cockpit = Cockpit(net.parameters(), quantities=configuration("economy", track_schedule=schedule))
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    work = batches(dm, steps)
    start = time.perf_counter()
    for step, (x, y) in enumerate(work):
        optimizer.zero_grad()
        logits = net(x)
        loss = loss_fn(logits, y)
        if cockpit is None:
            loss.backward()
        else:
            info = {"batch_size": x.shape[0], "individual_losses": per_sample(logits, y), "loss": loss,
                    "optimizer": optimizer}
            with cockpit(step, info=info):
                loss.backward(create_graph=cockpit.create_graph(step))
        optimizer.step()
    return time.perf_counter() - start


def lightning_loop(dm, steps: int, with_diagnostics: bool) -> float:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    module = plain_mlp_module(DEPTH, WIDTH, LR)
    callbacks = default_diagnostics() if with_diagnostics else []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp),
                            callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, limit_val_batches=0)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        return time.perf_counter() - start


def cockpit_problem() -> str | None:
    """Why Cockpit cannot run here, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import backpack  # noqa: F401
            import cockpit  # noqa: F401
    except Exception as exc:  # ImportError, or pkg_resources missing from a new setuptools
        return f"{type(exc).__name__}: {exc} (pip install -e \".[bench]\")"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=230)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20, help="Cockpit's tracked steps (economy: ~1 min each here)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {machine()}")
    print(f"model: plain MLP depth {DEPTH} width {WIDTH} (BN + LeakyReLU 0.3), USPS, batch 128, {args.steps} steps; "
          f"{args.repeats} interleaved repeats")
    dm = data()
    problem = cockpit_problem()
    if problem:
        print(f"Cockpit cannot run here: {problem}")
    bare, ck, light, ours = [], [], [], []
    tracked = len(range(0, args.steps, tracking_interval(args.steps, args.samples)))
    for i in range(args.repeats + 1):
        # the first round, a few steps long and without Cockpit's tracking (a tracked step costs about a
        # minute), warms up imports and allocators, and is not counted
        steps = args.steps if i else min(args.steps, 10)
        b = bare_loop(dm, steps, False)
        c = bare_loop(dm, steps, True, args.samples) if not problem and i else None
        lb = lightning_loop(dm, steps, False)
        lo = lightning_loop(dm, steps, True)
        if i == 0:
            continue
        bare.append(b)
        light.append(lb)
        ours.append(lo)
        if c is not None:
            ck.append(c)
        print(f"  repeat {i}: bare loop {b:.2f} s, + Cockpit {c if c is None else round(c, 2)} s; Lightning "
              f"{lb:.2f} s, + deepplain diagnostics {lo:.2f} s", flush=True)
    print(f"lightning_vs_bare={statistics.median(lt / b for lt, b in zip(light, bare)):.3f}")
    if ck:
        print(f"Cockpit: {tracked} tracked steps, "
              f"{statistics.median((c - b) / tracked for c, b in zip(ck, bare)):.1f} s each beyond the bare step")
        print(f"cockpit_overhead={statistics.median(c / b for c, b in zip(ck, bare)):.3f}")
    else:
        print("cockpit_overhead=unavailable")
    print(f"deepplain_overhead={statistics.median(o / lb for o, lb in zip(ours, light)):.3f}")


if __name__ == "__main__":
    main()
