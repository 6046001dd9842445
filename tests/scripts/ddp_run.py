"""Run by tests/test_ddp.py as ``python tests/scripts/ddp_run.py {foreign|van} OUT``: 2-process DDP on CPU (gloo).

Lightning's DDP launcher re-executes this script for rank 1, so it must be a file, not a pytest function.
"""
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from deepplain.callbacks import (  # noqa: E402
    ActivationSaturationMonitor,
    AlphaScheduler,
    ConditionNumberProbe,
    GradientFlowMonitor,
    MaxNormConstraint,
)

warnings.filterwarnings("ignore")
mode, out = sys.argv[1], Path(sys.argv[2])
common = dict(strategy="ddp", accelerator="cpu", devices=2, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, log_every_n_steps=1)
diagnostics = [ActivationSaturationMonitor(every_n_steps=2), ConditionNumberProbe(every_n_steps=2),
               GradientFlowMonitor(every_n_steps=2), MaxNormConstraint(1.0)]

if mode == "foreign":
    from tests.foreign import ForeignMLP, loaders
    torch.manual_seed(0)
    module = ForeignMLP(lr=1.0)
    train, val = loaders(n=128, batch_size=16)
    trainer = L.Trainer(max_steps=4, limit_val_batches=1, val_check_interval=2, callbacks=diagnostics,
                        logger=TensorBoardLogger(str(out), name="foreign"), **common)
    trainer.fit(module, train, val)
    norms = torch.stack([m.weight.norm(dim=1).max() for m in module.body if isinstance(m, torch.nn.Linear)])
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = trainer.strategy.all_gather(weights)
    result = {"max_row_norm": float(norms.max()), "weights_equal": bool(torch.equal(gathered[0], gathered[1])),
              "saturation_layers": sorted(diagnostics[0].last_stats) if trainer.global_rank == 0 else None}
else:
    from deepplain.datamodules import FakeDataModule

    from deepplain.family_modules import VANModule
    torch.manual_seed(0)
    module = VANModule(model="van", depth=3, arch="mlp", input_shape=(1, 8, 8), num_classes=4,
                       model_options={"width": 16}, lr=0.1, alpha_mode="off")
    dm = FakeDataModule(input_shape=(1, 8, 8), num_classes=4, train_size=256, test_size=32, batch_size=16,
                        val_split=0.0)
    trainer = L.Trainer(max_epochs=2, limit_val_batches=0, callbacks=[AlphaScheduler("lagrangian", 0.5), *diagnostics],
                        logger=TensorBoardLogger(str(out), name="van"), **common)
    trainer.fit(module, datamodule=dm)
    lam = torch.cat([g.lagrange_lambda for g in module.model.skip_gates()])
    alpha = torch.cat([g.alpha.detach() for g in module.model.skip_gates()])
    g_lam, g_alpha = trainer.strategy.all_gather(lam), trainer.strategy.all_gather(alpha)
    result = {"lambda_equal": bool(torch.equal(g_lam[0], g_lam[1])),
              "alpha_equal": bool(torch.equal(g_alpha[0], g_alpha[1])),
              "lambda_max": float(lam.max()), "steps": trainer.global_step}

if trainer.global_rank == 0:
    result["world_size"] = trainer.world_size
    (out / f"{mode}.json").write_text(json.dumps(result))
torch.distributed.destroy_process_group()  # before exit: gloo's threads alive at interpreter teardown can abort it
