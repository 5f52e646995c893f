"""Tests of checkpoint loading (hessspec.checkpoints) on real files written by torch and safetensors."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hessspec.checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    apply_state_dict,
    expand_checkpoint_paths,
    load_checkpoint,
    resolve_step,
    sort_by_step,
    step_from_filename,
)


class CustomConfig:
    """Not a tensor container: unpickling it needs arbitrary code, so weights_only refuses it."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_raw_state_dict(tmp_path):
    expected = state_of(small_model())
    path = tmp_path / "ckpt_000300.pt"
    torch.save(expected, path)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, LoadedCheckpoint)
    assert_same_state(loaded.state_dict, expected)
    assert loaded.format == "torch"
    assert loaded.step is None
    assert loaded.path == str(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(t.device.type == "cpu" for t in loaded.state_dict.values())
    assert resolve_step(loaded, path) == 300
    with pytest.raises(AttributeError):
        loaded.step = 3  # frozen


@pytest.mark.parametrize("container", ["model", "state_dict", "model_state_dict", "net"])
@pytest.mark.parametrize(("step_key", "step_value"), [("step", 40), ("global_step", torch.tensor(41)), ("epoch", 2)])
def test_nested_state_dicts_and_steps(tmp_path, container, step_key, step_value):
    expected = state_of(small_model())
    path = tmp_path / "checkpoint.pt"
    torch.save({container: expected, step_key: step_value, "optimizer": {"lr": 0.1}, "note": "hi"}, path)
    loaded = load_checkpoint(path)
    assert_same_state(loaded.state_dict, expected)
    assert loaded.step == int(step_value)
    assert resolve_step(loaded, path, explicit=7) == int(step_value)


def test_step_key_priority(tmp_path):
    path = tmp_path / "a.pt"
    torch.save({"model": state_of(small_model()), "epoch": 3, "global_step": 450}, path)
    assert load_checkpoint(path).step == 450


def test_non_tensor_values_are_dropped(tmp_path):
    state = state_of(small_model())
    path = tmp_path / "a.pt"
    torch.save({**state, "step": 5, "extra": [1, 2]}, path)
    loaded = load_checkpoint(path)
    assert_same_state(loaded.state_dict, state)
    assert set(loaded.dropped_keys) == {"step", "extra"}
    assert loaded.step == 5


def test_lightning_checkpoint(tmp_path):
    state = state_of(small_model())
    path = tmp_path / "epoch=3-step=1200.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 1200,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{key}": value for key, value in state.items()},
            "loops": {"fit_loop": {"state_dict": {}}},
            "callbacks": {},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
            "lr_schedulers": [],
            "hyper_parameters": {"width": 3},
        },
        path,
    )
    loaded = load_checkpoint(path)
    assert loaded.format == "lightning"
    assert loaded.step == 1200
    assert_same_state(loaded.state_dict, state)
    model = small_model()
    for parameter in model.parameters():
        parameter.data.zero_()
    apply_state_dict(model, loaded.state_dict)
    assert_same_state(state_of(model), state)


def test_lightning_keeps_keys_when_prefixes_differ(tmp_path):
    path = tmp_path / "l.ckpt"
    state = {"encoder.w": torch.ones(2), "head.w": torch.zeros(2)}
    torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": state}, path)
    assert list(load_checkpoint(path).state_dict) == ["encoder.w", "head.w"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    state = state_of(small_model())
    path = tmp_path / "ddp.pt"
    torch.save({"model": {prefix + key: value for key, value in state.items()}}, path)
    assert_same_state(load_checkpoint(path).state_dict, state)


def test_wrapper_prefix_kept_unless_all_keys_share_it(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, path)
    assert list(load_checkpoint(path).state_dict) == ["module.a", "b"]


def test_safetensors(tmp_path):
    state = {key: value.contiguous() for key, value in state_of(small_model()).items()}
    path = tmp_path / "model.safetensors"
    save_file({f"module.{k}": v for k, v in state.items()}, str(path), metadata={"step": "900"})
    loaded = load_checkpoint(path)
    assert loaded.format == "safetensors"
    assert loaded.step == 900
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_state(dict(sorted(loaded.state_dict.items())), dict(sorted(state.items())))
    # Recognised by content when the suffix says nothing.
    renamed = tmp_path / "weights_77.bin"
    save_file(state, str(renamed))
    loaded = load_checkpoint(renamed)
    assert loaded.format == "safetensors"
    assert loaded.step is None
    assert resolve_step(loaded, renamed) == 77


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"model.safetensors' is not a readable safetensors file"):
        load_checkpoint(path)


def _single_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_truncated_torch_files(tmp_path):
    state = state_of(small_model())
    full = tmp_path / "full.pt"
    torch.save(state, full)
    data = full.read_bytes()
    truncated = tmp_path / "half.pt"
    truncated.write_bytes(data[: len(data) // 2])
    message = _single_line_error(truncated)
    assert "truncated or corrupt" in message
    _single_line_error(truncated, unsafe=True)
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:200])
    assert "truncated or corrupt" in _single_line_error(legacy)


def test_empty_text_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "is empty" in _single_line_error(empty)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n" * 10)
    message = _single_line_error(text)
    assert "not a checkpoint file of any supported format" in message and "these are not weights" in message
    assert "does not exist" in _single_line_error(tmp_path / "missing.pt")
    assert "is not a file" in _single_line_error(tmp_path)


def test_custom_class_needs_unsafe_load(tmp_path):
    state = state_of(small_model())
    path = tmp_path / "custom.pt"
    torch.save({"model": state, "config": CustomConfig(), "step": 12}, path)
    message = _single_line_error(path)
    assert "--unsafe-load" in message
    assert "CustomConfig" in message
    assert "would execute code" in message
    loaded = load_checkpoint(path, unsafe=True)
    assert loaded.step == 12
    assert_same_state(loaded.state_dict, state)


def test_pickled_module_loads_only_unsafely(tmp_path):
    model = small_model()
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)
    assert "--unsafe-load" in _single_line_error(path)
    loaded = load_checkpoint(path, unsafe=True)
    assert loaded.format == "torch-module"
    assert_same_state(loaded.state_dict, state_of(model))


def test_no_tensors_or_not_a_mapping(tmp_path):
    path = tmp_path / "nothing.pt"
    torch.save({"step": 3, "config": {"lr": 0.1}}, path)
    message = _single_line_error(path)
    assert "holds no tensors" in message
    assert "'step'" in message
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(2)], listed)
    assert "holds a builtins.list" in _single_line_error(listed)
    nested_empty = tmp_path / "nested.pt"
    torch.save({"model": {"a": 1}}, nested_empty)
    assert "holds no tensors" in _single_line_error(nested_empty)


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("ckpt_000300.pt", 300),
        ("step=1200.ckpt", 1200),
        ("epoch3-step450.pt", 450),
        ("epoch=3-step=450.ckpt", 450),
        ("global_step_80.pth", 80),
        ("model_steps_5.bin", 5),
        ("epoch12.pt", 12),
        ("run2_iter_0070.safetensors", 70),
        ("final.pt", None),
        ("ckpt.300", 300),
        ("/some/dir_99/latest.pt", None),
    ],
)
def test_step_from_filename(name, step):
    assert step_from_filename(name) == step


def test_resolve_step_precedence(tmp_path):
    stored = LoadedCheckpoint(state_dict={}, step=5, path="ckpt_10.pt", sha256="", format="torch")
    assert resolve_step(stored, "ckpt_10.pt", explicit=20) == 5
    unnamed = LoadedCheckpoint(state_dict={}, step=None, path="ckpt_10.pt", sha256="", format="torch")
    assert resolve_step(unnamed) == 10
    assert resolve_step(unnamed, "final.pt", explicit=20) == 20
    with pytest.raises(CheckpointError, match="pass --step"):
        resolve_step(unnamed, "final.pt")
    with pytest.raises(CheckpointError, match="non-negative integer, got -1"):
        resolve_step(unnamed, "final.pt", explicit=-1)


def test_expand_checkpoint_paths(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("ckpt_2.pt", "ckpt_10.pt", "ckpt_1.pth", "weights.safetensors", "notes.txt", "b.CKPT"):
        (run / name).write_bytes(b"x")
    (run / "sub").mkdir()
    (run / "sub" / "ckpt_99.pt").write_bytes(b"x")
    from_dir = expand_checkpoint_paths([str(run)])
    assert [p.name for p in from_dir] == ["b.CKPT", "ckpt_1.pth", "ckpt_10.pt", "ckpt_2.pt", "weights.safetensors"]
    from_glob = expand_checkpoint_paths([str(run / "ckpt_*.pt")])
    assert [p.name for p in from_glob] == ["ckpt_10.pt", "ckpt_2.pt"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_checkpoint_paths(["~/run/ckpt_2.pt", "~/run/ckpt_1.p*"]) == [run / "ckpt_2.pt", run / "ckpt_1.pth"]
    monkeypatch.chdir(tmp_path)
    mixed = expand_checkpoint_paths(["run/ckpt_2.pt", str(run / "ckpt_2.pt"), "run/*.pt", "run"])
    assert [p.name for p in mixed] == ["ckpt_2.pt", "ckpt_10.pt", "b.CKPT", "ckpt_1.pth", "weights.safetensors"]
    assert [p.name for p in sort_by_step(mixed)] == [
        "ckpt_1.pth",
        "ckpt_2.pt",
        "ckpt_10.pt",
        "b.CKPT",
        "weights.safetensors",
    ]


def test_expand_checkpoint_paths_errors(tmp_path):
    with pytest.raises(CheckpointError, match="at least one"):
        expand_checkpoint_paths([])
    with pytest.raises(CheckpointError, match="missing.pt' does not exist"):
        expand_checkpoint_paths([str(tmp_path / "missing.pt")])
    with pytest.raises(CheckpointError, match="matches no files"):
        expand_checkpoint_paths([str(tmp_path / "*.pt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(CheckpointError, match=r"contains no checkpoint files \(expected names ending in .pt"):
        expand_checkpoint_paths([str(empty)])


def test_apply_state_dict_key_errors():
    model = small_model()
    state = state_of(model)
    missing = {k: v for k, v in state.items() if not k.startswith("3.")}
    with pytest.raises(CheckpointError, match=r"2 keys missing from the checkpoint: '3.weight', '3.bias'"):
        apply_state_dict(model, missing)
    extra = {**state, "head.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"1 key in the checkpoint not in the model: 'head.weight'"):
        apply_state_dict(model, extra)
    prefixed = {f"encoder.{k}": v for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"keys look prefixed with 'encoder.'"):
        apply_state_dict(model, prefixed)


def test_apply_state_dict_shape_mismatch_names_shapes():
    model = small_model()
    state = state_of(model)
    state["3.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError, match=r"'3.weight': checkpoint \[5, 3\] vs model \[2, 3\]"):
        apply_state_dict(model, state)


def test_apply_state_dict_refuses_non_finite_and_leaves_model_untouched():
    model = small_model()
    before = state_of(model)
    state = state_of(model)
    state["0.weight"] = torch.full_like(state["0.weight"], 7.0)
    state["1.running_var"][1] = float("inf")
    with pytest.raises(CheckpointError, match=r"'1.running_var' has 1 non-finite value"):
        apply_state_dict(model, state)
    assert_same_state(state_of(model), before)
    state["1.running_var"][1] = 1.0
    state["3.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match=r"'3.bias'"):
        apply_state_dict(model, state)


def test_round_trip_through_zoo_model(tmp_path):
    from hessspec.models import build_model

    trained = build_model("mlp-bn", width=8, depth=3)
    trained(torch.randn(16, 64))  # updates BN running statistics
    path = tmp_path / "step=25.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    loaded = load_checkpoint(path)
    fresh = build_model("mlp-bn", width=8, depth=3)
    apply_state_dict(fresh, loaded.state_dict)
    assert_same_state(state_of(fresh), state_of(trained))
    assert resolve_step(loaded, path) == 25


class _RunsCode:
    """Its reduction calls os.system: unpickling it runs a shell command."""

    def __reduce__(self):
        import os

        return (os.system, ("echo unpickled",))


def test_a_pickle_that_would_run_code_names_the_global_and_unsafe_load(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": state_of(small_model()), "payload": _RunsCode()}, path)
    message = _single_line_error(path)
    assert "would execute code" in message and "system" in message and "--unsafe-load" in message


def _numpy_1_names(path: Path) -> None:
    """Rewrite a torch.save zip so its pickle names numpy.core.* as NumPy 1 wrote them (GLOBAL is text)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle_name = next(name for name in members if name.endswith("data.pkl"))
    assert b"numpy._core.multiarray" in members[pickle_name]
    members[pickle_name] = members[pickle_name].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("numpy_1", [False, True])
def test_numpy_argparse_and_paths_load_without_unsafe(tmp_path, numpy_1):
    import argparse
    import datetime
    import pathlib

    state = state_of(small_model())
    extras = {
        "lr": np.float64(0.1), "best": np.float32(0.9), "epoch": np.int64(3), "dtype": np.dtype("float32"),
        "history": np.arange(4.0), "args": argparse.Namespace(lr=0.1, out=pathlib.Path("runs/a")),
        "dir": pathlib.Path("/data/x"), "when": datetime.datetime(2025, 1, 2, 3, 4, 5),
    }  # fmt: skip
    path = tmp_path / "train.pt"
    torch.save({"model": state, **extras, "step": 7}, path)
    if numpy_1:
        _numpy_1_names(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # refused by torch's own allowlist
    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.format == "torch"
    assert_same_state(loaded.state_dict, state)
    # The safe types are allowed only while hessspec loads: torch's global allowlist is left as it was.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
