"""Named recipes from the papers. ``--preset NAME`` loads one; explicit flags override it."""
from __future__ import annotations

from .errors import ConfigError

# The recipe a dataset implies (by its default architecture, ``datamodules.DATASETS``) when neither a
# preset nor a flag says otherwise.
RECIPES = {
    "conv": dict(arch="conv", lr=0.1, weight_decay=1e-4, epochs=165, batch_size=128, schedule="multistep",
                 milestones=[82, 125]),  # the VAN/ResNet CIFAR recipe
    "mlp": dict(arch="mlp", lr=0.01, weight_decay=0.0, epochs=50, batch_size=128, schedule="none",
                milestones=[0.5, 0.75]),
}

COURSEWORK = dict(arch="conv", layout="coursework", activation="lrelu", negative_slope=0.01, init="default",
                  dataset="cifar100", optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=100, batch_size=100,
                  schedule="cosine")

PRESETS: dict[str, dict] = {
    "oyedotun-mlp-100": dict(
        _doc="PlainNet paper: 100-layer MLP, 300 units, BN + LeakyReLU(0.3) + max-norm 3 + He-uniform, on USPS "
             "(batch 128, momentum 0.9, weight decay 1e-4, 300 epochs)",
        model="plain", arch="mlp", depth=100, width=300, norm="bn", activation="lrelu", negative_slope=0.3,
        init="he-uniform", max_norm=3.0, dataset="usps", optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4,
        epochs=300, batch_size=128, schedule="multistep", milestones=[0.5, 0.75]),
    "oyedotun-conv-50": dict(
        _doc="PlainNet paper Table A1: 50-layer conv PlainNet (0.72M parameters) on CIFAR-10, same recipe, 400 epochs",
        model="plain", arch="conv", depth=50, layout="oyedotun-50", norm="bn", activation="lrelu", negative_slope=0.3,
        init="he-uniform", max_norm=3.0, dataset="cifar10", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
        epochs=400, batch_size=128, schedule="multistep", milestones=[0.5, 0.75]),
    "van-26-cifar10": dict(
        _doc="VAN paper: VAN-26 (8n+2, n=3) on CIFAR-10, SGD 0.1, momentum 0.9, 165 epochs, /10 at 82 and 125, "
             "eta' = eta/10",
        model="van", arch="conv", depth=26, dataset="cifar10", optimizer="sgd", lr=0.1, momentum=0.9,
        weight_decay=1e-4, epochs=165, batch_size=128, schedule="multistep", milestones=[82, 125],
        alpha_mode="lagrangian", lambda_lr_ratio=0.1),
    "van-mlp-mnist": dict(
        _doc="VAN paper Sec. 4.1: width-50 VAN MLP (30 blocks) on MNIST, SGD 0.001, momentum 0.9, 50 epochs, "
             "batch 128, eta' = eta/2",
        model="van", arch="mlp", depth=30, width=50, dataset="mnist", optimizer="sgd", lr=0.001, momentum=0.9,
        weight_decay=0.0, epochs=50, batch_size=128, schedule="none", alpha_mode="lagrangian", lambda_lr_ratio=0.5),
    "dirac-28-10-cifar10": dict(
        _doc="DiracNet paper: DiracNet-28-10 (36.5M parameters) on CIFAR-10 with WRN's recipe: SGD 0.1 nesterov, "
             "weight decay 5e-4, 200 epochs, x0.2 at 60/120/160",
        model="dirac", arch="conv", depth=28, width=10, dataset="cifar10", optimizer="sgd", lr=0.1, momentum=0.9,
        nesterov=True, weight_decay=5e-4, epochs=200, batch_size=128, schedule="multistep", milestones=[60, 120, 160],
        gamma=0.2),
    # The coursework report's Table 1 (``models.coursework``): 32 filters per conv, Leaky ReLU (PyTorch's slope,
    # 0.01), PyTorch's default init (the report sets none), Adam 1e-3, cosine, batch 100, 100 epochs.
    "vgg08-cifar100": dict(
        _doc="Coursework report: VGG08 (7 convs of 32 filters, 60K parameters, no BN) on CIFAR-100, Adam 1e-3, "
             "cosine, batch 100, 100 epochs",
        model="plain", **COURSEWORK, depth=8, norm="none"),
    "vgg38-cifar100": dict(
        _doc="Coursework report: the 'broken' VGG38 (37 convs, 336K parameters, no BN, no skips); gradients vanish",
        model="plain", **COURSEWORK, depth=38, norm="none"),
    "vgg38-bn-cifar100": dict(
        _doc="Coursework report: VGG38 + BN (338K parameters; the report: 339K)",
        model="plain", **COURSEWORK, depth=38, norm="bn"),
    "vgg38-rc-cifar100": dict(
        _doc="Coursework report: VGG38 + residual connections, no BN (336K parameters)",
        model="resnet", **COURSEWORK, depth=38, norm="none"),
    "vgg38-bn-rc-cifar100": dict(
        _doc="Coursework report: VGG38 + BN + residual connections (338K parameters; the report: 339K)",
        model="resnet", **COURSEWORK, depth=38, norm="bn"),
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[name].items() if not k.startswith("_")}


def describe_presets() -> str:
    return "\n".join(f"  {name:<22} {spec['_doc']}" for name, spec in PRESETS.items())
