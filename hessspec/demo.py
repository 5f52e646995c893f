"""The whole study on built-in data: BN vs no-BN networks trained on scikit-learn's digits, analysed across training.

Two copies of the same 6-layer, width-64 ReLU MLP with He initialisation (21k parameters), one with BatchNorm
and one without, are trained with plain SGD from the same seed; real checkpoints are saved at log-spaced steps
(dense in the first few hundred steps, where Ghorbani et al. (2019) saw the outliers appear); every checkpoint is
analysed on the whole data set (1,797 examples) with the same pipeline as ``hessspec analyze``; the figures and a
contrast table are written next to the result files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hessspec.analysis import AnalysisSettings
from hessspec.data.datasets import digits_arrays
from hessspec.models import build_model
from hessspec.runner.pipeline import AnalysisJob, Observer, run
from hessspec.training import train_sgd

RUNS = {"nobn": ("mlp", "MLP, no BN"), "bn": ("mlp-bn", "MLP, BN")}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the defaults finish in under 10 minutes on 2 CPU cores).

    Attributes:
        save_steps: training steps at which checkpoints are saved.
        lr, batch_size, seed: SGD settings (the analysis uses the same batch size, so BN train mode normalises
            with batches as in training).
        lanczos_steps, probes, top_k: SLQ settings, the paper's (90 steps, 10 probes) scaled to ~10k parameters.
        dtype: dtype the networks are evaluated in during the analysis (Lanczos is float64 in any case).
    """

    save_steps: tuple[int, ...] = (0, 10, 25, 50, 100, 200, 400, 800, 1600, 3000)
    lr: float = 0.05
    batch_size: int = 128
    seed: int = 0
    lanczos_steps: int = 60
    probes: int = 5
    top_k: int = 20
    dtype: str = "float32"
    device: str = "cpu"
    runs: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(RUNS))

    @classmethod
    def quick(cls) -> DemoConfig:
        """A tiny version for smoke tests (seconds)."""
        return cls(save_steps=(0, 20, 100), lanczos_steps=12, probes=2, top_k=5)


def _train_run(name: str, model_name: str, config: DemoConfig, ckpt_dir: Path, echo: Callable[[str], None]) -> None:
    marker = ckpt_dir / "training.json"
    recipe = {
        "model": model_name,
        **{k: v for k, v in asdict(config).items() if k in ("save_steps", "lr", "batch_size", "seed")},
    }
    recipe["save_steps"] = list(recipe["save_steps"])
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        echo(f"{name}: checkpoints already trained in {ckpt_dir}")
        return
    images, labels = digits_arrays()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    torch.manual_seed(config.seed)
    model = build_model(model_name, num_classes=10)

    def saved(step: int, loss: float) -> None:
        echo(f"{name}: saved step {step:5d}" + (f" (batch loss {loss:.4f})" if step else ""))

    train_sgd(
        model,
        x,
        y,
        config.save_steps,
        ckpt_dir,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=config.seed,
        on_save=saved,
    )
    marker.write_text(json.dumps(recipe))


def run_demo(
    out_dir: str | Path = "results/demo",
    config: DemoConfig | None = None,
    *,
    echo: Callable[[str], None] = print,
    observer_factory: Callable[[str], Observer] | None = None,
) -> list[dict]:
    """Train, analyse and plot the BN vs no-BN study on the digits data.

    Args:
        out_dir: where ``bn.h5``, ``nobn.h5``, the figures and ``summary.md`` go (checkpoints in
            ``out_dir/checkpoints/<run>/``).
        config: :class:`DemoConfig`.
        echo: prints a line of progress.
        observer_factory: makes the analysis progress observer of a run (the CLI's progress bars), or None.

    Returns:
        The contrast table: one dict per run with λ1, outliers and r_k at the first, peak and last checkpoint.
    """
    from hessspec import plots
    from hessspec.store import load_results

    config = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = AnalysisSettings(
        lanczos_steps=config.lanczos_steps, probes=config.probes, top_k=config.top_k, seed=config.seed
    )
    runs = []
    for name, (model_name, label) in config.runs.items():
        ckpt_dir = out / "checkpoints" / name
        _train_run(name, model_name, config, ckpt_dir, echo)
        job = AnalysisJob(
            model=model_name,
            data="digits",
            batch_size=config.batch_size,
            dtype=config.dtype,
            device=config.device,
            settings=settings,
            label=label,
        )
        observer = observer_factory(name) if observer_factory is not None else None
        run(job, [str(ckpt_dir)], out / f"{name}.h5", observer=observer)
        runs.append(load_results(out / f"{name}.h5"))

    for r, name in zip(runs, config.runs, strict=True):
        plots.save_figure(plots.plot_density(r, layout="grid"), out / f"density_{name}.png")
        plots.save_figure(plots.plot_overlap(r, step=_peak_step(r)), out / f"overlap_{name}.png")
    plots.save_figure(plots.plot_density(runs), out / "density.png")  # the runs side by side, same steps
    plots.save_figure(plots.plot_evolution(runs), out / "evolution.png")

    table = [_summarise(r) for r in runs]
    (out / "summary.md").write_text(format_table(table) + "\n")
    return table


def _peak_step(run) -> int:
    """The trained checkpoint (step > 0, if any) with the largest λ1, where the outliers are most pronounced."""
    trained = [c for c in run.checkpoints if c.step > 0] or list(run.checkpoints)
    return max(trained, key=lambda c: c.lambda_max).step


def _summarise(run) -> dict:
    first, last = run.checkpoints[0], run.checkpoints[-1]
    peak = run.get(_peak_step(run)) if len({c.step for c in run.checkpoints}) == len(run.checkpoints) else last
    after = [c for c in run.checkpoints if c.step > 0]
    k = int(min(10, len(last.overlap_k)))
    return {
        "run": run.label,
        "steps": f"{first.step}-{last.step}",
        "lambda1_first": first.lambda_max,
        "lambda1_peak": peak.lambda_max,
        "lambda1_peak_step": peak.step,
        "lambda1_last": last.lambda_max,
        "outliers_median": sorted(c.num_outliers() for c in after)[len(after) // 2] if after else 0,
        f"r{k}_median": sorted(c.overlap_at(k) for c in after)[len(after) // 2] if after else float("nan"),
        f"r{k}_last": last.overlap_at(k),
        "loss_last": last.loss,
    }


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the contrast between the runs."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["RUNS", "DemoConfig", "format_table", "run_demo"]
