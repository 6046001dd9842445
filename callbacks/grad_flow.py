"""GradientFlowMonitor: per-layer gradient norms, to see where gradients vanish or explode."""
from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer
from typing_extensions import override

from . import figures
from .outputs import add_image
from .probing import gradient_layers, layer_gradient_tensors
from .publish import DepthTimeSpec, Publisher
from .sampling import MAX_OVERHEAD, MIN_SAMPLES, NUM_SAMPLES, SamplingCallback


class GradientFlowMonitor(SamplingCallback):
    """The L2 norm and mean |grad| of each layer's weight gradient (Linear, Conv, Embedding; for
    RNN/LSTM/GRU and MultiheadAttention all their weight matrices together). Cadence and time
    budget: see ``deepplain.callbacks.sampling``.

    TensorBoard (see ``deepplain.callbacks.publish``): the depth x time image
    ``grad_flow/depth_time/norm`` (log colour scale), depth quantiles
    ``grad_flow/depth_{min,median,max}/norm``; per layer ``grad_flow/{norm,mean_abs}/<layer>`` only
    with ``per_layer_scalars=True``; when training ends, ``grad_flow/profile`` against layer index
    (the coursework report's Fig. 2/3) at the first, middle and last samples. Every value is in
    ``diagnostics.csv``.

    Gradients are read in ``on_before_optimizer_step``: after DDP's all-reduce and after the
    mixed-precision unscale, so every rank sees the same values and rank zero logs them. Works with
    manual optimization too (the hook runs at each ``optimizer.step()``).

    Example::

        import lightning as L
        from deepplain.callbacks import GradientFlowMonitor
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                            callbacks=[GradientFlowMonitor(num_samples=10, include=["model.*"])])
    """

    prefix = "grad_flow"
    overview_images = {"train": ("norm",)}

    def __init__(self, every_n_steps: Optional[int] = None, num_samples: int = NUM_SAMPLES,
                 include: Optional[list[str]] = None,
                 exclude: Optional[list[str]] = None, figure_every_n_samples: Optional[int] = None,
                 use_log_every_n_steps: bool = False, max_overhead: Optional[float] = MAX_OVERHEAD,
                 per_layer_scalars: bool = False, min_samples: int = MIN_SAMPLES):
        super().__init__(every_n_steps=every_n_steps, num_samples=num_samples,
                         use_log_every_n_steps=use_log_every_n_steps, max_overhead=max_overhead,
                         figure_every_n_samples=figure_every_n_samples, include=include, exclude=exclude,
                         per_layer_scalars=per_layer_scalars, min_samples=min_samples)
        self._layers = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._layers = self.select_layers(pl_module, gradient_layers(pl_module, self.include, self.exclude),
                                          "Linear, Conv, recurrent, attention or embedding layer")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        if trainer.global_rank != 0 or not self.decide(trainer):
            return
        step = trainer.global_step
        with self.timed_sample() as cost:
            self._sample(trainer, step)
        self.record(step, cost[0])
        self.maybe_refresh(trainer, step)

    def make_publisher(self) -> Publisher:
        specs = {"norm": DepthTimeSpec("gradient norm per layer", scale="log", label="||grad||")}
        return Publisher(self.prefix, specs, {"norm": ("min", "median", "max")},
                         per_layer_scalars=self.per_layer_scalars)

    def draw(self, trainer, key: str, samples: list) -> None:
        norms = {f"step {step}": [v[0] for v in values] for step, values in samples}
        fig = figures.depth_profiles([(norms, "gradient norm", True, None)],
                                     "gradient flow by depth, first, middle and last samples")
        add_image(trainer, f"{self.prefix}/profile", figures.to_image(fig), samples[-1][0])

    def _sample(self, trainer, step: int) -> None:
        names, rows = [], []
        for name, module in self._layers:
            grads = layer_gradient_tensors(module)
            if not grads:
                continue
            g = torch.cat([grad.detach().float().flatten() for grad in grads]) if len(grads) > 1 else \
                grads[0].detach().float()
            names.append(name)
            rows.append(torch.stack([g.norm(), g.abs().mean()]))
        if not rows:
            return
        values = torch.stack(rows).cpu().tolist()
        self.last_stats = {n: {"norm": v[0], "mean_abs": v[1]} for n, v in zip(names, values)}
        self.publish(trainer, step, "train", self.last_stats)
        self.keep_for_figures(trainer, "profile", step, values)
