"""Model families: shapes, parameter counts against the papers, gradients, depth rules, fold/export."""
import pytest
import torch
from deepplain.callbacks.probing import skip_gates as iter_skip_gates
from torch import nn

import deepplain
from deepplain import ConfigError, build_model, count_parameters, model_names
from deepplain.layers import BatchNorm1d, BatchNorm2d
from deepplain.models import DiracConv2d, DiracLinear
from deepplain.models.resnet import block_for_depth
from deepplain.optim import parameter_groups

SHAPES = {"mnist": ((1, 28, 28), 10), "usps": ((1, 16, 16), 10), "coil20": ((1, 32, 32), 20),
          "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}
MLP_CASES = [("plain", 4), ("van", 3), ("dirac", 3), ("resnet", 3), ("highway", 3)]
CONV_CASES = [("plain", {"depth": 8}), ("plain", {"depth": 50, "layout": "oyedotun-50"}), ("van", {"depth": 10}),
              ("dirac", {"depth": 10}), ("resnet", {"depth": 8}), ("resnet", {"depth": 11, "block": "bottleneck"})]


@pytest.mark.fast
@pytest.mark.parametrize("dataset", list(SHAPES))
@pytest.mark.parametrize("name,depth", MLP_CASES)
def test_mlp_output_shapes(name, depth, dataset):
    shape, classes = SHAPES[dataset]
    model = build_model(name, depth, arch="mlp", input_shape=shape, num_classes=classes)
    assert model(torch.randn(3, *shape)).shape == (3, classes)


@pytest.mark.fast
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "mnist", "usps"])
@pytest.mark.parametrize("name,kwargs", CONV_CASES)
def test_conv_output_shapes(name, kwargs, dataset):
    shape, classes = SHAPES[dataset]
    kwargs = dict(kwargs)
    model = build_model(name, kwargs.pop("depth"), arch="conv", input_shape=shape, num_classes=classes, **kwargs)
    assert model(torch.randn(2, *shape)).shape == (2, classes)


def millions(name, depth, **kw):
    return count_parameters(build_model(name, depth, **kw)) / 1e6


@pytest.mark.fast
@pytest.mark.parametrize("depth,expected", [(3, 0.50), (50, 4.78)])
def test_plainnet_table1_parameter_counts(depth, expected):
    # PlainNet paper Table I: 1,024 inputs (32x32 COIL-20), 300 units, 20 classes.
    got = millions("plain", depth, arch="mlp", input_shape=(1, 32, 32), num_classes=20, width=300)
    assert got == pytest.approx(expected, rel=0.02)


@pytest.mark.fast
def test_oyedotun_conv50_parameter_count():
    got = millions("plain", 50, arch="conv", input_shape=(3, 32, 32), num_classes=10, layout="oyedotun-50")
    assert got == pytest.approx(0.72, rel=0.10)
    model = build_model("plain", 50, arch="conv", input_shape=(3, 32, 32), num_classes=10, layout="oyedotun-50")
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 50


@pytest.mark.fast
@pytest.mark.parametrize("depth,width,expected", [(28, 10, 36.5), (28, 5, 9.1), (34, 1, 0.47), (34, 2, 1.85)])
def test_diracnet_cifar_parameter_counts(depth, width, expected):
    got = millions("dirac", depth, arch="conv", input_shape=(3, 32, 32), num_classes=10, width=width)
    assert got == pytest.approx(expected, rel=0.02)


@pytest.mark.fast
@pytest.mark.parametrize("depth,expected", [(18, 11.7), (34, 21.8)])
def test_diracnet_imagenet_parameter_counts(depth, expected):
    got = millions("dirac", depth, arch="conv", input_shape=(3, 224, 224), num_classes=1000, layout="imagenet")
    assert got == pytest.approx(expected, rel=0.02)


@pytest.mark.fast
@pytest.mark.parametrize("depth,block,expected", [(56, "basic", 0.85), (110, "basic", 1.7), (164, "bottleneck", 1.7)])
def test_preact_resnet_parameter_counts(depth, block, expected):
    got = millions("resnet", depth, arch="conv", input_shape=(3, 32, 32), num_classes=10, block=block)
    assert got == pytest.approx(expected, rel=0.02)


def first_weight(model):
    return next(m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.fast
@pytest.mark.parametrize("name,arch,depth", [("plain", "mlp", 20), ("van", "mlp", 20), ("dirac", "mlp", 20),
                                             ("resnet", "mlp", 20), ("highway", "mlp", 20), ("plain", "conv", 14),
                                             ("van", "conv", 18), ("dirac", "conv", 16), ("resnet", "conv", 20)])
def test_gradients_reach_first_layer(name, arch, depth):
    torch.manual_seed(0)
    shape = (3, 32, 32) if arch == "conv" else (1, 16, 16)
    model = build_model(name, depth, arch=arch, input_shape=shape, num_classes=10)
    loss = nn.functional.cross_entropy(model(torch.randn(8, *shape)), torch.arange(8) % 10)
    loss.backward()
    grad = first_weight(model).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.fast
@pytest.mark.parametrize("name,arch,depth,message", [
    ("van", "conv", 27, "van conv depth must be 8n+2 (10, 18, 26, 34, ...; VAN-26 is n=3), got 27"),
    ("dirac", "conv", 27, "dirac conv depth must be 6n+4 (10, 16, 22, 28, 34, ...), got 27"),
    ("resnet", "conv", 57, "resnet conv depth must be 6n+2 with basic blocks (8, 14, 20, ..., 56, 110) or 9n+2 with "
                           "bottleneck blocks (11, 20, 29, ..., 164, 1001), got 57"),
    ("plain", "conv", 9, "plain conv depth must be 3n+2"),
    ("plain", "mlp", 0, "depth must be a positive integer, got 0"),
    ("highway", "conv", 10, "highway has no 'conv' form; valid: mlp"),
])
def test_invalid_depths_rejected_with_valid_values(name, arch, depth, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
                       .replace(".", r"\.")):
        build_model(name, depth, arch=arch, input_shape=(3, 32, 32), num_classes=10)


# Parameter counts of He et al. (ResNet-20/56/110: 0.27M/0.85M/1.7M; pre-activation ResNet-164/1001: 1.7M/10.2M).
@pytest.mark.fast
@pytest.mark.parametrize("depth,block,millions_expected", [
    (20, "basic", 0.27), (32, "basic", None), (56, "basic", 0.85), (110, "basic", 1.7), (29, "bottleneck", None),
    (164, "bottleneck", 1.7), (1001, "bottleneck", 10.2)])
def test_resnet_block_follows_depth_as_he_et_al(depth, block, millions_expected):
    assert block_for_depth(depth) == block
    with torch.device("meta"):
        model = build_model("resnet", depth, arch="conv", input_shape=(3, 32, 32), num_classes=10)
    convs = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    blocks = (depth - 2) // (9 if block == "bottleneck" else 6)
    assert convs == 1 + (3 if block == "bottleneck" else 6) * blocks  # the stem + one or two 3x3 per block
    if millions_expected is not None:
        assert count_parameters(model) / 1e6 == pytest.approx(millions_expected, rel=0.03)


@pytest.mark.fast
def test_bottleneck_and_imagenet_depth_rules():
    with pytest.raises(ConfigError, match=r"9n\+2"):
        build_model("resnet", 57, arch="conv", input_shape=(3, 32, 32), num_classes=10, block="bottleneck")
    with pytest.raises(ConfigError, match="18 or 34"):
        build_model("dirac", 50, arch="conv", input_shape=(3, 224, 224), num_classes=10, layout="imagenet")


@pytest.mark.fast
def test_unknown_model_and_option_errors():
    with pytest.raises(ConfigError, match=f"unknown model 'vgg'; valid models: {', '.join(model_names())}$"):
        build_model("vgg", 3)
    with pytest.raises(ConfigError, match="van mlp does not take option.* activation; valid: width, init"):
        build_model("van", 3, arch="mlp", activation="lrelu")
    with pytest.raises(ConfigError, match="width must be a positive integer, got 0"):
        build_model("plain", 3, arch="mlp", width=0)
    with pytest.raises(ConfigError, match="activation must be one of relu, lrelu, prelu"):
        build_model("plain", 3, arch="mlp", activation="tanh")


@pytest.mark.fast
def test_plain_variants_are_flags():
    naive = build_model("plain", 3, arch="mlp", norm="none", activation="relu")
    proposed = build_model("plain", 3, arch="mlp", norm="bn", activation="lrelu", negative_slope=0.3)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in naive.modules())
    acts = [m for m in proposed.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 3 and all(a.negative_slope == 0.3 for a in acts)
    # every activation is its own module, so a hook on it identifies one layer
    assert len({id(a) for a in acts}) == 3


@pytest.mark.fast
def test_he_uniform_init_bound():
    model = build_model("plain", 2, arch="mlp", input_shape=(1, 20, 20), width=300, init="he-uniform",
                        activation="lrelu", negative_slope=0.3)
    w = model.features[1].linear.weight
    bound = (6 / ((1 + 0.3 ** 2) * 400)) ** 0.5  # He et al.: sqrt(6 / ((1 + a^2) fan_in))
    assert w.abs().max() <= bound + 1e-6 and w.abs().max() > 0.95 * bound


@pytest.mark.fast
def test_van_exposes_alpha_parameters_and_lambda_buffers():
    model = build_model("van", 4, arch="mlp", input_shape=(1, 16, 16), width=50)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    alpha_names = [n for n in params if "alpha" in n]
    lambda_names = [n for n in buffers if "lambda" in n]
    assert len(alpha_names) == 4 and len(lambda_names) == 4
    assert all(params[n].shape == (50,) and (params[n] == 0).all() for n in alpha_names)
    assert all((buffers[n] == -1).all() for n in lambda_names)
    assert len(list(iter_skip_gates(model))) == 4
    conv = build_model("van", 10, arch="conv", input_shape=(3, 32, 32))
    gates = [g for _, g in iter_skip_gates(conv)]
    assert [g.alpha.numel() for g in gates] == [16, 32, 64, 128]  # per channel, one block per group at n=1


@pytest.mark.fast
def test_van_with_alpha_zero_is_a_resnet_and_alpha_one_has_no_skip():
    torch.manual_seed(0)
    model = build_model("van", 2, arch="mlp", input_shape=(1, 4, 4), width=8).eval()
    block = model.blocks[0]
    x = torch.randn(5, 8)
    assert torch.allclose(block(x), block.residual(x) + x)
    with torch.no_grad():
        block.gate.alpha.fill_(1.0)
    assert torch.allclose(block(x), block.residual(x))


@pytest.mark.fast
@pytest.mark.parametrize("arch,depth,shape", [("mlp", 5, (1, 16, 16)), ("conv", 18, (3, 32, 32))])
def test_van_export_equals_model_when_all_alphas_are_one(arch, depth, shape):
    torch.manual_seed(0)
    model = build_model("van", depth, arch=arch, input_shape=shape, num_classes=10)
    randomise_batchnorm(model)
    model.eval()
    for _, gate in iter_skip_gates(model):
        with torch.no_grad():
            gate.alpha.fill_(1.0)
    plain = deepplain.fold(model).eval()
    assert not list(iter_skip_gates(plain))
    assert not any(isinstance(m, nn.Identity) for m in plain.modules())
    x = torch.randn(6, *shape)
    assert torch.allclose(model(x), plain(x), atol=1e-5)


@pytest.mark.fast
def test_van_export_refuses_alphas_below_one():
    model = build_model("van", 3, arch="mlp", input_shape=(1, 4, 4))
    with pytest.raises(ConfigError, match="every alpha == 1; 150 of 150 alphas are below 1"):
        deepplain.fold(model)


@pytest.mark.fast
def test_fold_rejects_other_families():
    with pytest.raises(ConfigError, match="only a VAN .* can be exported as a plain network; 3 block.s. have ungated"):
        deepplain.fold(build_model("resnet", 3, arch="mlp"))
    with pytest.raises(ConfigError, match="fold\\(\\) supports DiracNet and VAN models, got PlainMLP"):
        deepplain.fold(build_model("plain", 3, arch="mlp"))


def randomise_batchnorm(model):
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=generator))
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


@pytest.mark.fast
@pytest.mark.parametrize("arch,depth,shape,kw", [("conv", 16, (3, 32, 32), {"width": 2}), ("mlp", 6, (1, 16, 16), {}),
                                                 ("conv", 18, (3, 64, 64), {"layout": "imagenet"})])
def test_dirac_fold_matches_eval_outputs(arch, depth, shape, kw):
    torch.manual_seed(0)
    model = build_model("dirac", depth, arch=arch, input_shape=shape, num_classes=10, **kw)
    randomise_batchnorm(model)
    for m in model.modules():  # move a and b away from their initial values, as training would
        if isinstance(m, (DiracConv2d, DiracLinear)):
            with torch.no_grad():
                m.a.uniform_(0.5, 1.5)
                m.b.uniform_(0.05, 0.5)
    model.eval()
    plain = deepplain.fold(model).eval()
    kinds = {type(m) for m in plain.modules()} - {nn.Sequential}
    assert kinds <= {nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten}
    x = torch.randn(4, *shape)
    reference = model(x)
    assert torch.allclose(plain(x), reference, atol=1e-4 * reference.abs().max().item())


@pytest.mark.fast
def test_dirac_conv_parameterisation():
    torch.manual_seed(0)
    conv = DiracConv2d(4, 4)
    assert (conv.a == 1).all() and torch.allclose(conv.b, torch.full((4,), 0.1))
    w = conv.effective_weight()
    norms = (w - torch.nn.init.dirac_(torch.empty_like(w))).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((4,), 0.1), atol=1e-6)  # diag(b) W_norm: unit filters times b
    with torch.no_grad():
        conv.b.zero_()
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(conv(x), x, atol=1e-6)  # a = 1, b = 0: the identity
    wide = DiracConv2d(3, 5)
    with torch.no_grad():
        wide.b.zero_()
    y = wide(torch.ones(1, 3, 4, 4))
    assert torch.allclose(y[:, :3], torch.ones(1, 3, 4, 4)) and (y[:, 3:] == 0).all()  # partial identity


@pytest.mark.fast
def test_highway_gate_bias_starts_negative():
    model = build_model("highway", 3, arch="mlp", input_shape=(1, 4, 4), gate_bias=-3.0)
    for layer in model.blocks:
        assert torch.allclose(layer.gate.bias, torch.full_like(layer.gate.bias, -3.0))


@pytest.mark.fast
def test_highway_gate_starts_input_independent_and_deep_highway_gradients_do_not_explode():
    model = build_model("highway", 3, arch="mlp", input_shape=(1, 4, 4))
    x = torch.randn(7, 50)
    for layer in model.blocks:  # every gate is sigmoid(b_T), whatever the input
        assert torch.allclose(torch.sigmoid(layer.gate(x)), torch.full((7, 50), torch.sigmoid(torch.tensor(-2.0))))

    def first_layer_gradient(name, seed):
        torch.manual_seed(seed)
        net = build_model(name, 30, arch="mlp", input_shape=(1, 28, 28), width=50)
        images, labels = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
        nn.functional.cross_entropy(net(images), labels).backward()
        return next(p for p in net.parameters() if p.dim() == 2).grad.norm().item()

    for seed in range(3):  # with W_T initialised like W_H this was hundreds to thousands of times ResNet's
        assert first_layer_gradient("highway", seed) < 3 * first_layer_gradient("resnet", seed)


@pytest.mark.fast
def test_weight_decay_skips_biases_norms_and_method_scales():
    for name, arch in [("van", "conv"), ("dirac", "conv"), ("plain", "mlp")]:
        model = build_model(name, 10, arch=arch, input_shape=(3, 32, 32), num_classes=10, **(
            {"activation": "prelu"} if name == "plain" else {}))
        groups = parameter_groups(model, 5e-4)
        assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = [names[id(p)] for p in groups[0]["params"]]
        skipped = [names[id(p)] for p in groups[1]["params"]]
        assert all(n.endswith("weight") and "norm" not in n for n in decayed)
        assert all(n.endswith(("bias", "alpha", ".a", ".b")) or "norm" in n or "act" in n for n in skipped)
        assert len(decayed) + len(skipped) == len(names)
        if name == "van":
            assert sum(n.endswith("alpha") for n in skipped) == 4
        if name == "dirac":
            assert any(n.endswith(".a") for n in skipped) and any(n.endswith(".b") for n in skipped)


@pytest.mark.fast
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_keeps_the_variance_training_normalises_with(momentum):
    """deepplain's BN stores the biased batch variance (what training divides by), not PyTorch's unbiased one."""
    torch.manual_seed(0)
    x = torch.randn(8, 4) * 3 + 1
    ours, theirs = BatchNorm1d(4, momentum=momentum), nn.BatchNorm1d(4, momentum=momentum)
    buffer = ours.running_var
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)  # training mode normalises as PyTorch's does
    assert ours.running_var is buffer  # updated in place: DDP broadcasts the module's own buffers
    step = momentum if momentum is not None else 1.0
    assert torch.allclose(ours.running_var, (1 - step) + step * x.var(0, unbiased=False))
    assert torch.allclose(theirs.running_var, (1 - step) + step * x.var(0, unbiased=True))  # the difference
    assert torch.allclose(ours.running_mean, theirs.running_mean)
    images = torch.randn(4, 3, 5, 5)
    conv = BatchNorm2d(3, momentum=None)
    conv(images)
    assert torch.allclose(conv.running_var, images.var((0, 2, 3), unbiased=False), atol=1e-6)


@pytest.mark.fast
def test_eval_mode_reproduces_training_mode_on_the_statistics_it_saw():
    """After one batch seen with a cumulative average, eval mode gives training mode's outputs on it; with
    PyTorch's unbiased running variance a 30-layer MLP at batch 32 does not."""
    def gap(norm_class):
        torch.manual_seed(0)
        model = build_model("plain", 30, arch="mlp", input_shape=(1, 4, 4), num_classes=5, width=16)
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.BatchNorm1d):
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1], norm_class(m.num_features, momentum=None))
        x = torch.randn(32, 1, 4, 4)
        with torch.no_grad():
            trained = model.train()(x)
            return float((model.eval()(x) - trained).abs().max() / trained.abs().max())
    ours, pytorch = gap(BatchNorm1d), gap(nn.BatchNorm1d)
    assert ours < 1e-4 and pytorch > 100 * ours
