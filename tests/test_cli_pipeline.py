"""The library layer under ``hessspec analyze`` (hessspec.runner.pipeline) and the CLI's progress line."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

from hessspec.analysis import AnalysisSettings
from hessspec.checkpoints import CheckpointError
from hessspec.cli._progress import ProgressLine, bar, format_duration
from hessspec.runner import pipeline
from hessspec.runner.pipeline import (
    AnalysisJob,
    Observer,
    PipelineError,
    analyze_checkpoint,
    plan_checkpoints,
    prepare,
    resolve_device,
    run,
)
from hessspec.store import load_results
from tests.test_cli import one_thread, write_checkpoints  # noqa: F401 (one_thread: a fixture)

SETTINGS = AnalysisSettings(lanczos_steps=8, probes=2, top_k=3)


def job(**changes) -> AnalysisJob:
    base = {"model": "mlp", "data": "digits", "model_args": {"width": 8, "depth": 2}, "samples": 120}
    return AnalysisJob(**{**base, "settings": SETTINGS, **changes})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline")
    write_checkpoints(directory, steps=(0, 20, 40))
    return directory


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def planned(self, plan, done, prepared) -> None:
        self.events.append(("planned", [c.step for c in plan], list(done)))

    def skipped(self, item) -> None:
        self.events.append(("skipped", item.step))

    def started(self, item, index, total) -> None:
        self.events.append(("started", item.step, index, total))

    def lanczos_step(self, done, total) -> None:
        self.events.append(("lanczos", done, total))

    def finished(self, item, result) -> None:
        self.events.append(("finished", item.step, result.step))


def _recording_sync(seen: list) -> object:
    """A ``sync`` hook that records which guarded step failed, with the error type, and re-raises."""

    @contextlib.contextmanager
    def sync(what: str):
        try:
            yield
        except Exception as error:
            seen.append((what, type(error).__name__))
            raise

    return sync


def test_run_reports_progress_and_resumes(ckpts, tmp_path):
    out = tmp_path / "r.h5"
    recorder = Recorder()
    files = [ckpts / "ckpt_00040.pt", ckpts / "ckpt_00000.pt"]  # analysed in step order, whatever the order given
    report = run(job(), files, out, observer=recorder)
    assert [r.step for r in report.analysed] == [0, 40] and report.skipped == ()
    assert recorder.events[0] == ("planned", [0, 40], [False, False])
    assert recorder.events[1] == ("started", 0, 0, 2)
    assert [e for e in recorder.events if e[0] == "lanczos"][:8] == [("lanczos", i, 8) for i in range(1, 9)]
    assert recorder.events[-1] == ("finished", 40, 40)
    assert load_results(out).label == "r"  # a new file is named after itself

    recorder = Recorder()
    report = run(job(), [ckpts], out, observer=recorder)
    assert [c.step for c in report.skipped] == [0, 40] and [r.step for r in report.analysed] == [20]
    assert recorder.events[0] == ("planned", [0, 20, 40], [True, False, True])
    assert ("skipped", 0) in recorder.events and ("started", 20, 0, 1) in recorder.events
    assert load_results(out).steps == (0, 20, 40)


def test_hooks_for_data_parallel_runs(ckpts, tmp_path):
    reduced = []

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:  # one process: the sum is the tensor itself
        reduced.append(tensor.shape)
        return tensor

    def first_half(batches):
        return batches[: len(batches) // 2]

    guarded = []

    @contextlib.contextmanager
    def sync(what: str):
        guarded.append(what)
        yield

    verified = []

    def verify(result, what: str) -> None:
        verified.append((result.step, what))

    out = tmp_path / "worker.h5"
    report = run(
        job(batch_size=30), [ckpts / "ckpt_00020.pt"], out, is_main=False, all_reduce=all_reduce,
        shard_batches=first_half, sync=sync, verify=verify, world_size=2,
    )  # fmt: skip
    assert not out.exists()  # only the main process writes
    assert report.analysed[0].n_samples == 60  # two of the four batches of 30
    assert torch.Size([1]) in reduced  # the skip decision is agreed through all_reduce
    assert len(reduced) > 10  # and the Hessian products are reduced
    assert guarded == [
        f"checking {out}", "reading the checkpoints", "building the model and loading the data",
        "planning the memory", f"opening {out}",
        f"loading {ckpts / 'ckpt_00020.pt'}", "checking memory for step 20", f"writing step 20 to {out}",
    ]  # fmt: skip
    assert verified == [(20, "step 20")]

    prepared = prepare(job(batch_size=30), shard_batches=first_half)
    assert (len(prepared.batches), prepared.num_examples) == (2, 60)  # this process's share ...
    assert (prepared.total_batches, prepared.total_examples) == (4, 120)  # ... of the whole data


def test_main_process_records_world_size_and_writes_only_verified_results(ckpts, tmp_path):
    out = tmp_path / "main.h5"
    run(job(), [ckpts / "ckpt_00000.pt"], out, verify=lambda result, what: None, world_size=2)
    assert load_results(out).config["world_size"] == 2
    assert "world_size" not in job().config(device="cpu")  # one process records none

    def diverged(result, what: str) -> None:
        if result.step == 20:
            raise ValueError(f"the ranks computed different values for {what}")

    with pytest.raises(ValueError, match="different values for step 20"):
        run(job(), [ckpts], out, verify=diverged, world_size=2)
    assert load_results(out).steps == (0,)  # step 20 is not written; the run stops before step 40


def test_memory_is_checked_inside_a_sync_block_before_the_data_passes(ckpts, tmp_path, monkeypatch):
    calls, seen = [], []

    def check_memory(n, settings, chains, device, block_sizes=()):
        calls.append((n, chains, device, block_sizes))
        raise MemoryError("the Lanczos bases need 9.00 GiB")

    def analyze(*args, **kwargs):
        raise AssertionError("analysed although the memory check failed")

    sync = _recording_sync(seen)

    monkeypatch.setattr(pipeline, "check_memory", check_memory)
    monkeypatch.setattr(pipeline, "analyze_many", analyze)
    with pytest.raises(MemoryError, match="9.00 GiB"):
        run(job(), [ckpts / "ckpt_00020.pt"], tmp_path / "o.h5", sync=sync)
    assert seen == [("checking memory for step 20", "MemoryError")]
    # The estimate of analysis.analyze: every parameter, the probes (no gradient chain by default), on the model's
    # device.
    assert not SETTINGS.gradient_crosscheck
    assert calls == [(64 * 8 + 8 + 8 * 10 + 10, SETTINGS.probes, torch.device("cpu"), ())]
    assert load_results(tmp_path / "o.h5").steps == ()


def test_sync_sees_rank_local_failures(ckpts, tmp_path):
    seen = []

    sync = _recording_sync(seen)

    with pytest.raises(CheckpointError):
        run(job(), [tmp_path / "missing.pt"], tmp_path / "o.h5", sync=sync)
    assert seen == [("reading the checkpoints", "CheckpointError")]


def test_prepare_builds_once_and_analysis_leaves_the_model_as_loaded(ckpts):
    prepared = prepare(job())
    assert prepared.num_params == 64 * 8 + 8 + 8 * 10 + 10 and prepared.num_examples == 120
    plan = plan_checkpoints([ckpts])
    (result,) = analyze_checkpoint(prepared, plan[1])
    saved = torch.load(plan[1].path, weights_only=True)["model"]
    for name, tensor in prepared.model.state_dict().items():
        assert torch.equal(tensor, saved[name])
    assert result.step == 20 and result.sha256 == plan[1].sha256 and result.model == "mlp"


def test_params_regex_selects_a_subspace():
    prepared = prepare(job(params=r"^layers\.3\."))
    assert prepared.num_params == 8 * 10 + 10


def test_effective_model_args_and_config():
    assert job(data="cifar100:/data/c100", model="cifar-resnet20").effective_model_args()["num_classes"] == 100
    assert job(model_args={"num_classes": 3}).effective_model_args()["num_classes"] == 3
    synthetic = job(data="synthetic", data_args={"num_classes": 4})
    assert synthetic.effective_model_args()["num_classes"] == 4
    assert "num_classes" not in job(model="my_models:make", model_args={}).effective_model_args()
    config = job(data="cifar10:~/data/c10").config(device="cpu")
    assert config["data"] == "cifar10" and config["data_root"] == "~/data/c10"  # the root may move between machines
    assert config["lanczos_steps"] == 8 and config["device"] == "cpu"


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(PipelineError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(PipelineError, match="unknown device"):
        resolve_device("gpu")


def test_progress_line_draws_bars_rate_and_eta(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    now = [0.0]
    stream = io.StringIO()
    progress = ProgressLine(stream, enabled=True, clock=lambda: now[0])
    progress.begin(3)
    progress.start_checkpoint(0, 100)
    now[0] = 2.0
    progress.lanczos(10, 40)  # 5 steps/s, 6 s left on this checkpoint, then two more of 8 s
    text = progress.text()
    assert "checkpoint 1/3" in text and "step 100" in text and "10/40" in text
    assert "5 steps/s" in text and "ETA 0:06" in text and "(all 0:22)" in text
    assert stream.getvalue().endswith(text)
    progress.echo("a summary line")
    assert stream.getvalue().endswith("\r\x1b[K")  # cleared before printing
    silent = io.StringIO()
    quiet = ProgressLine(silent, enabled=False)
    quiet.begin(1)
    quiet.start_checkpoint(0, 0)
    quiet.lanczos(1, 2)
    assert silent.getvalue() == ""


class _TerminalStream(io.StringIO):
    """A stream on file descriptor 97, whose terminal size the test decides."""

    def fileno(self) -> int:
        return 97


def _draw_half_way(stream) -> ProgressLine:
    now = [0.0]
    progress = ProgressLine(stream, enabled=True, clock=lambda: now[0])
    progress.begin(12)
    progress.start_checkpoint(10, 123456)
    now[0] = 2.0
    progress.lanczos(45, 90)
    return progress


@pytest.mark.parametrize("columns", [160, 60, 40])
def test_progress_line_fits_the_width_of_its_own_terminal(monkeypatch, columns):
    # stdout is a terminal of 80 columns (or redirected); the progress line goes to stderr, a wider or narrower one.
    monkeypatch.delenv("COLUMNS", raising=False)
    real = os.get_terminal_size

    def size(fd=None):
        return os.terminal_size((columns, 24)) if fd == 97 else os.terminal_size((80, 24))

    monkeypatch.setattr(os, "get_terminal_size", size)
    stream = _TerminalStream()
    progress = _draw_half_way(stream)
    monkeypatch.setattr(os, "get_terminal_size", real)
    drawn = stream.getvalue().split("\r\x1b[K")[-1]
    full = progress.text()
    assert len(full) > 80
    assert len(drawn) <= columns - 1
    if columns > len(full):
        assert drawn == full
    else:  # parts are dropped rather than the line cut: the counts and the ETA stay
        assert "11/12" in drawn and "45/90" in drawn and "ETA" in drawn


def test_progress_helpers():
    assert bar(0.5, 4) == "[##--]" and bar(2.0, 2) == "[##]"
    assert format_duration(61) == "1:01" and format_duration(3661) == "1:01:01"
    assert format_duration(float("nan")) == "?"


def test_curvatures_and_blocks_are_stored_and_resumed_by_what_is_missing(ckpts, tmp_path):
    """All (curvature, block) results of a checkpoint come from one analysis in shared passes; a rerun asking for
    more computes the checkpoints that lack something and writes only what is missing."""
    out = tmp_path / "c.h5"
    first = job(settings=AnalysisSettings(lanczos_steps=8, probes=2, top_k=3, blocks=("modules",)))
    report = run(first, [ckpts / "ckpt_00020.pt"], out)
    kinds = [("hessian", "all"), ("hessian", "layers.1"), ("hessian", "layers.3")]
    assert [(r.curvature, r.block) for r in report.analysed] == kinds
    stored = load_results(out)
    hessian = stored.get(20, block="layers.1")
    assert hessian.n_params == 64 * 8 + 8 and hessian.lanczos_steps == 8
    # The whole-model result is that of a run without blocks (same probes, same chains).
    alone = run(job(), [ckpts / "ckpt_00020.pt"], tmp_path / "alone.h5").analysed[0]
    assert (stored.get(20).top_eigenvalues == alone.top_eigenvalues).all()

    more = job(settings=AnalysisSettings(lanczos_steps=8, probes=2, top_k=3, blocks=("modules",),
                                         curvatures=("hessian", "ggn")))  # fmt: skip
    report = run(more, [ckpts / "ckpt_00020.pt", ckpts / "ckpt_00040.pt"], out)
    assert [(r.step, r.curvature, r.block) for r in report.analysed] == [
        (20, "ggn", "all"), (20, "ggn", "layers.1"), (20, "ggn", "layers.3"),
        *((40, c, b) for c in ("hessian", "ggn") for b in ("all", "layers.1", "layers.3")),
    ]  # fmt: skip
    stored = load_results(out)
    assert (stored.get(20, block="layers.1").nodes == hessian.nodes).all()  # kept, not recomputed
    ggn = stored.get(40, curvature="ggn", block="layers.3")
    assert ggn.curvature == "ggn" and ggn.n_params == 8 * 10 + 10
    assert float(ggn.nodes.min()) > -1e-6 * float(ggn.nodes.max())  # G is positive semi-definite
    assert run(more, [ckpts / "ckpt_00020.pt", ckpts / "ckpt_00040.pt"], out).analysed == ()
