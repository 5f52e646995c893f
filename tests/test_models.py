"""Tests of the model zoo (hessspec.models)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from hessspec.models import (
    FactoryError,
    ModelError,
    UnknownModelError,
    available_models,
    build_model,
    load_factory,
    parse_model_args,
)
from hessspec.models.cifar_resnet import BasicBlock
from hessspec.models.mlp import MLP


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_available_models_lists_the_zoo():
    names = available_models()
    assert names == sorted(names)
    for name in ("mlp", "mlp-bn", "cnn", "cnn-bn"):
        assert name in names
    for depth in (20, 32, 56):
        assert f"cifar-resnet{depth}" in names
        assert f"cifar-resnet{depth}-nobn" in names


@pytest.mark.parametrize(
    ("name", "input_shape"),
    [
        ("mlp", (3, 1, 8, 8)),
        ("mlp-bn", (3, 64)),
        ("cnn", (3, 1, 8, 8)),
        ("cnn-bn", (3, 1, 8, 8)),
        ("cifar-resnet20", (2, 3, 32, 32)),
        ("cifar-resnet20-nobn", (2, 3, 32, 32)),
    ],
)
def test_zoo_models_give_logits(name, input_shape):
    torch.manual_seed(0)
    model = build_model(name)
    out = model(torch.randn(*input_shape))
    assert out.shape == (input_shape[0], 10)
    assert torch.isfinite(out).all()


# Known counts (He et al. 2016 ResNet-20: 0.27M, ResNet-32: 0.46M; 269,722 and 464,154 exactly, as in the
# widely used re-implementation with option-A shortcuts).
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("cifar-resnet20", 269_722),
        ("cifar-resnet32", 464_154),
        ("cifar-resnet56", 853_018),
        ("cifar-resnet20-nobn", 269_034),
        ("cifar-resnet32-nobn", 463_018),
    ],
)
def test_cifar_resnet_parameter_counts(name, count):
    assert n_params(build_model(name)) == count


def test_nobn_swaps_batchnorm_scale_and_shift_for_conv_biases():
    # Every conv output channel carries BN's (weight, bias) with BN, one conv bias without.
    for depth in (20, 32):
        with_bn = build_model(f"cifar-resnet{depth}")
        without = build_model(f"cifar-resnet{depth}-nobn")
        channels = sum(m.out_channels for m in with_bn.modules() if isinstance(m, nn.Conv2d))
        assert n_params(with_bn) - n_params(without) == channels
        assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
        assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))
        assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))


def test_resnet_depth_and_stage_shapes():
    model = build_model("cifar-resnet32", num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32  # 6n + 1 convolutions and the linear layer
    assert model.linear.out_features == 100
    x = torch.randn(2, 3, 32, 32)
    out = model.conv1(x)
    for layer, (channels, size) in zip(
        (model.layer1, model.layer2, model.layer3), ((16, 32), (32, 16), (64, 8)), strict=True
    ):
        out = layer(out)
        assert out.shape == (2, channels, size, size)


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = BasicBlock(16, 32, stride=2, batch_norm=False)
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    x = torch.randn(2, 16, 8, 8)
    out = block(x)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = torch.relu(x[:, :, ::2, ::2])
    torch.testing.assert_close(out, expected)


def test_mlp_structure_and_he_init():
    torch.manual_seed(0)
    model = build_model("mlp", width=512, depth=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3  # depth counts Linear layers
    assert [m.out_features for m in linears] == [512, 512, 10]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    hidden = linears[1].weight
    assert hidden.std().item() == pytest.approx((2.0 / 512) ** 0.5, rel=0.05)
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)


def test_mlp_bn_and_options():
    model = build_model("mlp-bn", in_features=20, num_classes=3, width=8, depth=4, activation="tanh")
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    assert model(torch.randn(5, 20)).shape == (5, 3)
    assert n_params(build_model("mlp")) == 5 * (64 * 64 + 64) + 64 * 10 + 10
    assert isinstance(build_model("mlp", depth=1).layers[1], nn.Linear)


def test_cnn_structure():
    model = build_model("cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 16, (3, 3), (1, 1)),
        (16, 32, (3, 3), (1, 1)),
    ]
    assert n_params(model) == 9_930
    bn = build_model("cnn-bn", width=8, num_classes=4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2
    assert bn(torch.randn(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        ("mlp", {"widht": 3}, "widht"),
        ("mlp", {"width": 0}, "width must be an integer >= 1, got 0"),
        ("mlp", {"activation": "swish"}, "activation must be one of"),
        ("mlp-bn", {"batch_norm": False}, "batch_norm is fixed by the name"),
        ("cnn", {"image_size": 7}, "image_size must be even"),
        ("cifar-resnet20", {"blocks_per_stage": 2}, "fixed by the name"),
        ("cifar-resnet20", {"num_classes": "ten"}, "num_classes must be an integer"),
    ],
)
def test_bad_arguments_raise_model_error(name, kwargs, fragment):
    with pytest.raises(ModelError, match=fragment):
        build_model(name, **kwargs)


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as info:
        build_model("cifar-resnet23")
    message = str(info.value)
    assert "'cifar-resnet23'" in message
    assert "did you mean" in message
    for name in available_models():
        assert name in message
    assert "tv:NAME" in message
    assert "module:function" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError, match="expected a model name"):
        build_model("")


def test_torchvision_models_are_built_without_downloading(monkeypatch):
    import torchvision.models
    import torchvision.models._api

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    model = build_model("tv:resnet18", num_classes=7)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 7
    # This builder would fetch an ImageNet backbone by default; hessspec passes weights_backbone=None.
    with pytest.raises(AssertionError, match="download"):
        torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, num_classes=3)
    segmenter = build_model("tv:lraspp_mobilenet_v3_large", num_classes=3)
    assert isinstance(segmenter, nn.Module)


def test_torchvision_errors():
    with pytest.raises(UnknownModelError, match=r"tv:resnet19.*did you mean tv:resnet18"):
        build_model("tv:resnet19")
    with pytest.raises(ModelError, match="without pretrained weights"):
        build_model("tv:resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ModelError, match="cannot build tv:resnet18"):
        build_model("tv:resnet18", bogus=1)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module importable only from tmp_path (the working directory), with a unique name."""
    name = f"usermodels_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make(width=4, num_classes=2):
                return nn.Sequential(nn.Flatten(), nn.Linear(3, width), nn.ReLU(), nn.Linear(width, num_classes))

            def not_a_model():
                return [1, 2, 3]

            def broken():
                raise RuntimeError("boom")

            class Factory:
                @staticmethod
                def create():
                    return nn.Linear(2, 2)

            VALUE = 3
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_user_factory_from_working_directory(user_module, tmp_path):
    before = list(sys.path)
    model = build_model(f"{user_module}:make", width=5, num_classes=3)
    assert sys.path == before  # the working directory was added only while importing
    assert isinstance(model, nn.Sequential)
    assert model[1].out_features == 5
    assert model(torch.randn(2, 3)).shape == (2, 3)
    assert isinstance(build_model(f"{user_module}:Factory.create"), nn.Linear)
    assert isinstance(build_model(f"{tmp_path / user_module}.py:make"), nn.Sequential)


def test_user_factory_errors(user_module):
    with pytest.raises(ModelError, match=r"must return a torch.nn.Module, got builtins.list"):
        build_model(f"{user_module}:not_a_model")
    with pytest.raises(ModelError, match=r"raised RuntimeError: boom"):
        build_model(f"{user_module}:broken")
    with pytest.raises(ModelError, match=r"raised TypeError"):
        build_model(f"{user_module}:make", depth=3)
    with pytest.raises(FactoryError, match=r"has no attribute 'nope'.*make"):
        build_model(f"{user_module}:nope")
    with pytest.raises(FactoryError, match=r"no module named 'no_such_module_xyz'"):
        build_model("no_such_module_xyz:make")
    with pytest.raises(FactoryError, match="must name a callable, got a int"):
        load_factory(f"{user_module}:VALUE")
    with pytest.raises(FactoryError, match="exactly one ':'"):
        load_factory("a:b:c")
    with pytest.raises(FactoryError, match="both parts non-empty"):
        load_factory(f"{user_module}:")
    with pytest.raises(FactoryError, match="does not exist"):
        load_factory("missing_file.py:make")


def test_user_factory_import_error_is_reported(tmp_path, monkeypatch):
    name = f"brokenmodels_{uuid.uuid4().hex}"
    Path(tmp_path / f"{name}.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FactoryError, match=r"importing module .* failed: No module named 'no_such_dependency_xyz'"):
        load_factory(f"{name}:make")


def test_parse_model_args():
    parsed = parse_model_args(
        ["width=32", "lr=0.5", "batch_norm=true", "bias=False", "head=None", "activation=tanh", "tag=a=b", "x=1e3"]
    )
    assert parsed == {
        "width": 32,
        "lr": 0.5,
        "batch_norm": True,
        "bias": False,
        "head": None,
        "activation": "tanh",
        "tag": "a=b",
        "x": 1000.0,
    }
    assert type(parsed["width"]) is int
    assert parse_model_args([]) == {}
    assert MLP(**parse_model_args(["width=8", "depth=2"]))(torch.randn(1, 64)).shape == (1, 10)


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        (["width"], "expected KEY=VALUE, got 'width'"),
        (["=3"], "KEY a Python identifier"),
        (["two words=3"], "KEY a Python identifier"),
        (["a=1", "a=2"], "given twice"),
    ],
)
def test_parse_model_args_errors(pairs, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_model_args(pairs)
