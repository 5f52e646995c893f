"""Data placements (device, host, stream) deliver the same batches and give the same results, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hessspec.analysis import AnalysisSettings, analyze
from hessspec.curvature.hessian import HessianOperator
from hessspec.data.datasets import load_dataset, materialize
from hessspec.data.placement import (
    DeviceBatches,
    HostBatches,
    PlacementError,
    StreamBatches,
    check_placement,
    choose_placement,
    place,
    stacked_bytes,
)
from hessspec.runner.distributed import DistributedContext

FIELDS = ("nodes", "weights", "top_eigenvalues", "top_residuals", "overlap_ratio", "cos2", "gradient_nodes")
BATCH = 8


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A real image folder: 3 classes of 8x8 RGB images, PNG and JPEG files (29 images, an unequal last batch)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(29):
        folder = root / f"class{index % 3}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        suffix = "png" if index % 2 else "jpg"
        Image.fromarray(pixels).save(folder / f"img{index:03d}.{suffix}")
    return root


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)
    ).double()


def _sources(dataset):
    device = torch.device("cpu")
    stacked = materialize(dataset, BATCH, device, torch.float64)
    return {
        "device": DeviceBatches(stacked, device),
        "host": HostBatches(materialize(dataset, BATCH, "cpu", torch.float64), device),
        "stream": StreamBatches(dataset, BATCH, device, torch.float64, workers=2),
    }


def test_every_placement_yields_the_same_batches(image_folder):
    dataset = load_dataset(f"imagefolder:{image_folder}", image_size=None)
    sources = _sources(dataset)
    reference = list(sources["device"])
    assert [len(x) for x, _ in reference] == [8, 8, 8, 5]
    for name, source in sources.items():
        assert source.sizes() == [8, 8, 8, 5] and len(source) == 4, name
        for _ in range(2):  # every pass the same
            got = list(source)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, reference, strict=True))
            assert all(x.dtype == torch.float64 and y.dtype == torch.int64 for x, y in got)
        assert torch.equal(source.first()[0], reference[0][0])


@pytest.mark.parametrize("bn_mode", ["train", "population"])
def test_streamed_image_folder_equals_the_stacked_path(image_folder, bn_mode):
    """The same spectrum, bit for bit, from a folder of PNG/JPEG files decoded on the fly by 2 workers."""
    dataset = load_dataset(f"imagefolder:{image_folder}", image_size=None)
    settings = AnalysisSettings(lanczos_steps=12, probes=2, top_k=4, seed=3)
    results = {}
    for name, source in _sources(dataset).items():
        op = HessianOperator(_cnn(), source, bn_mode=bn_mode, block_strategy="reverse")
        results[name] = analyze(op, settings)
    for name in ("host", "stream"):
        for field in FIELDS:
            assert np.array_equal(getattr(results[name], field), getattr(results["device"], field)), (name, field)
        assert results[name].loss == results["device"].loss and results[name].n_samples == 29


def test_sharding_keeps_whole_batches_in_every_placement(image_folder):
    dataset = load_dataset(f"imagefolder:{image_folder}", image_size=None)
    sources = _sources(dataset)
    everything = list(sources["device"])
    for rank in range(2):
        ctx = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        start, stop = ctx.batch_range(4)
        for name, source in sources.items():
            share = ctx.shard_batches(source)
            assert type(share) is type(source) and share.sizes() == [len(x) for x, _ in everything[start:stop]]
            for (x, y), (xr, yr) in zip(share, everything[start:stop], strict=True):
                assert torch.equal(x, xr) and torch.equal(y, yr), (name, rank)
    assert ctx.shard_batches([1, 2, 3, 4]) == [3, 4]  # plain lists still work


def test_auto_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_placement("auto", 10, cpu, device_free=100).placement == "device"
    assert choose_placement("auto", 60, cpu, device_free=100).placement == "stream"
    assert choose_placement("auto", 60, gpu, device_free=100, host_free=1000).placement == "host"
    assert choose_placement("auto", 600, gpu, device_free=100, host_free=1000).placement == "stream"
    choice = choose_placement("host", 60, cpu, device_free=100)
    assert choice.placement == "host" and "as asked" in choice.reason
    assert "auto" in choose_placement("auto", 10, cpu, device_free=100).reason
    with pytest.raises(PlacementError, match="data placement"):
        check_placement("disk")
    with pytest.raises(PlacementError, match="workers"):
        check_placement("stream", -1)


def test_place_and_size_estimate(image_folder):
    dataset = load_dataset(f"imagefolder:{image_folder}", image_size=None)
    assert stacked_bytes(dataset, torch.float64) == 29 * (3 * 8 * 8 * 8 + 8)
    for placement in ("device", "host", "stream"):
        source, choice = place(dataset, BATCH, "cpu", torch.float64, placement=placement, workers=0)
        assert source.placement == choice.placement == placement
    source, choice = place(dataset, BATCH, "cpu", torch.float64)  # a few kB: auto keeps them on the device
    assert choice.placement == "device" and choice.reason.startswith("auto")


def test_cli_placements_store_the_same_numbers_and_resume_ignores_them(tmp_path):
    from click.testing import CliRunner

    from hessspec.cli import cli
    from hessspec.store import load_results
    from tests.test_cli import MODEL, SETTINGS, write_checkpoints

    checkpoint = str(write_checkpoints(tmp_path / "ckpts", steps=(40,))[0])
    args = ["analyze", checkpoint, *MODEL, *SETTINGS, "--dtype", "float64", "--hvp-strategy", "reverse"]
    runs = {}
    for placement in ("device", "stream"):
        out = tmp_path / f"{placement}.h5"
        result = CliRunner().invoke(cli, [*args, "--data-placement", placement, "--workers", "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"data: {placement}" in result.output
        runs[placement] = load_results(out).checkpoints[0]
    for field in FIELDS:
        assert np.array_equal(getattr(runs["stream"], field), getattr(runs["device"], field)), field
    again = CliRunner().invoke(cli, [*args, "--data-placement", "host", "--out", str(tmp_path / "stream.h5")])
    assert again.exit_code == 0 and "skipped" in again.output, again.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from hessspec.cli import cli
    from tests.test_cli import MODEL, SETTINGS, write_checkpoints

    checkpoints = write_checkpoints(tmp_path / "ckpts", steps=(0, 40))
    out = tmp_path / "res" / "run.h5"
    args = ["analyze", str(tmp_path / "ckpts"), *MODEL, *SETTINGS, "--crosscheck", "--probes-per-pass", "2"]
    args.append("--dry-run")
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("memory plan: data ") and "bases " in lines[0] and "2 column(s) per pass" in lines[0]
    # 2 probes + the gradient chain in groups of 2: 10 steps x 2 rounds + 1 gradient pass (the determinism check
    # rides on the first product pass).
    assert lines[1].startswith("estimated time per checkpoint: ") and "2 batches x 21 passes" in lines[1]
    assert "2 checkpoint(s) planned" in lines[1] and len(checkpoints) == 2
    assert not out.exists() and not out.parent.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_placements_and_bases_off_the_device(image_folder, tmp_path):
    """On a GPU: pinned host batches and streamed batches are prefetched on a side stream; bases in host memory or
    on disk are read back in chunks. Same spectrum as everything on the device, to the rounding of GPU kernels."""
    dataset = load_dataset(f"imagefolder:{image_folder}", image_size=None)
    device = torch.device("cuda")
    sources = {
        "device": DeviceBatches(materialize(dataset, BATCH, device, torch.float64), device),
        "host": HostBatches(materialize(dataset, BATCH, "cpu", torch.float64), device),
        "stream": StreamBatches(dataset, BATCH, device, torch.float64, workers=2),
    }
    assert all(x.is_pinned() for x, _ in sources["host"].batches)
    results = {}
    for name, source in sources.items():
        for basis in ("device", "host", "disk"):
            op = HessianOperator(_cnn().to(device), source, block_strategy="reverse")
            settings = AnalysisSettings(12, 2, 4, seed=3, basis_placement=basis, scratch_dir=str(tmp_path))
            results[name, basis] = analyze(op, settings)
    reference = results["device", "device"]
    scale = np.abs(reference.nodes).max()
    for key, result in results.items():
        np.testing.assert_allclose(result.nodes, reference.nodes, rtol=0, atol=1e-9 * scale, err_msg=str(key))
        np.testing.assert_allclose(result.top_eigenvalues, reference.top_eigenvalues, rtol=1e-9, err_msg=str(key))
    assert list(tmp_path.glob(".hessspec-basis-*")) == []


def test_batches_by_index(image_folder):
    dataset = load_dataset(f"imagefolder:{image_folder}", image_size=None)
    sources = _sources(dataset)
    everything = list(sources["device"])
    for name, source in sources.items():
        for i in (0, 3, -1):
            x, y = source[i]
            assert torch.equal(x, everything[i][0]) and torch.equal(y, everything[i][1]), (name, i)


def test_explicit_placement_that_cannot_fit_is_refused_before_stacking(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # 30 GiB asked for on a machine with 20 GiB free: one line naming the size and what helps.
    with pytest.raises(PlacementError) as info:
        choose_placement("device", 30 * 2**30, cpu, device_free=20 * 2**30)
    text = str(info.value)
    assert "\n" not in text and "30.00 GiB" in text and "20.00 GiB" in text
    assert "--samples" in text and "--data-placement stream" in text and "--data-placement host" not in text
    with pytest.raises(PlacementError, match="--data-placement host"):
        choose_placement("device", 30 * 2**30, gpu, device_free=20 * 2**30, host_free=100 * 2**30)
    with pytest.raises(PlacementError, match="stacked in cpu memory"):
        choose_placement("host", 30 * 2**30, gpu, device_free=100 * 2**30, host_free=20 * 2**30)
    assert choose_placement("host", 10 * 2**30, gpu, device_free=1, host_free=20 * 2**30).placement == "host"
    assert choose_placement("stream", 30 * 2**30, cpu, device_free=1).placement == "stream"  # never refused


def test_too_big_data_set_is_a_one_line_cli_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hessspec.cli import cli
    from hessspec.data import placement

    monkeypatch.setattr(placement, "available_bytes", lambda device: 1000)  # far less than the digits set
    model = tmp_path / "ckpt_0.pt"
    torch.save(__import__("hessspec").build_model("mlp", num_classes=10).state_dict(), model)
    args = ["analyze", str(model), "--model", "mlp", "--data", "digits", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--data-placement", "device", "--out", str(tmp_path / "o.h5")])
    assert result.exit_code != 0
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "GiB are free" in line and "--samples" in line
    assert not (tmp_path / "o.h5").exists()
