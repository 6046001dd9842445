"""Steps per second of deepplain's training loop (ImageClassifier + Lightning Trainer + the
whole-tensor data path, TensorBoard logging on, diagnostics off) divided by a hand-written PyTorch
loop doing the same work: same model and initial weights, same batches, same optimizer (same
parameter groups), cross-entropy and a running accuracy.

The two loops alternate step by step inside one process: after each of deepplain's steps, a callback
runs one step of the hand-written loop on its own copy of the model and times it. deepplain's step is
the time from one batch start to the next minus that hand-written step, so everything Lightning does
between batches counts, and the machine's drift (this VM's wall times vary by 10-20% between runs)
falls on both alike. Each repeat is one fit; the median of the repeats' ratios is reported.

    python benchmarks/framework_overhead.py           # VAN-26 on CIFAR-10 shapes, 30 timed steps
    python benchmarks/framework_overhead.py --quick   # 20-layer PlainNet MLP on MNIST shapes, 300 timed steps

Ends with ``framework_ratio=<ratio>``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

from _util import machine

WARMUP = 10


def setup(quick: bool, steps: int):
    import lightning as L
    from deepplain.datamodules import FakeDataModule

    from deepplain.family_modules import module_class
    L.seed_everything(0, verbose=False)
    if quick:
        shape, model, depth, arch, options = (1, 28, 28), "plain", 20, "mlp", {"width": 512}
    else:
        shape, model, depth, arch, options = (3, 32, 32), "van", 26, "conv", {}
    dm = FakeDataModule(input_shape=shape, num_classes=10, train_size=128 * (steps + WARMUP), test_size=128,
                        batch_size=128, val_split=0.0)
    dm.setup()
    cls = module_class(model)
    kwargs = dict(model=model, depth=depth, arch=arch, input_shape=shape, num_classes=10, model_options=options,
                  lr=0.05, weight_decay=1e-4)
    if model == "van":
        kwargs["alpha_mode"] = "off"  # the hand loop has no AlphaScheduler either
    return dm, cls(**kwargs)


class HandWritten:
    """The hand-written loop, one step at a time, on its own copy of the model and its own batches."""

    def __init__(self, model, loader):
        import torch

        from deepplain.optim import make_optimizer
        self.model = copy.deepcopy(model).train()
        self.optimizer = make_optimizer(self.model, "sgd", 0.05, 0.9, False, 1e-4)
        self.batches = iter(loader)
        self.correct, self.seen = torch.zeros(()), 0

    def step(self) -> float:
        import torch.nn.functional as F
        start = time.perf_counter()
        x, y = next(self.batches)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += y.numel()
        return time.perf_counter() - start


def paired(quick: bool, steps: int, logdir: str) -> tuple[float, float]:
    """(deepplain's steps/s, the hand-written loop's steps/s) over the same ``steps``, alternating."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    dm, module = setup(quick, steps)
    hand = HandWritten(module.model, dm.train_dataloader())
    times = {"ours": 0.0, "hand": 0.0}
    state = {"start": None, "hand": 0.0}

    class Alternate(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if state["start"] is not None and batch_idx > WARMUP:
                times["ours"] += now - state["start"] - state["hand"]
                times["hand"] += state["hand"]
            state["start"] = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["hand"] = hand.step()

        def on_train_end(self, trainer, pl_module):  # the last step: up to the end of training
            times["ours"] += time.perf_counter() - state["start"] - state["hand"]
            times["hand"] += state["hand"]
            float(hand.correct) / hand.seen  # the accuracy is read once, as the epoch-end metric would be

    trainer = L.Trainer(max_steps=steps + WARMUP, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir),
                        callbacks=[Alternate()], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(module, datamodule=dm)
    return steps / times["ours"], steps / times["hand"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    steps = 300 if args.quick else 30
    what = "20-layer PlainNet MLP (512 units), MNIST shapes" if args.quick else "VAN-26, CIFAR-10 shapes"
    print(f"machine: {machine()}")
    print(f"model: {what}, batch 128, SGD; {steps} timed steps after {WARMUP} warm-up steps, {args.repeats} repeats")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            ours_sps, hand = paired(args.quick, steps, tmp)
            ratios.append(ours_sps / hand)
            print(f"  repeat {i + 1}: deepplain {ours_sps:.2f} steps/s, hand-written {hand:.2f} steps/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"framework_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
