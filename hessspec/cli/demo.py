"""``hessspec demo``: the whole BN vs no-BN study on the built-in digits data, in a few minutes on a CPU."""

from __future__ import annotations

import warnings

import click

from hessspec.cli._common import CONTEXT_SETTINGS, debug_option, tune_allocator_for


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Train BN and no-BN MLPs on digits and analyse them.")
@click.option("--out", "out_dir", default="results/demo", show_default=True, help="Output directory.")
@click.option("--device", default="cpu", show_default=True, metavar="auto|cpu|cuda|cuda:I", help="Where to run.")
@click.option("--quick", is_flag=True, help="A tiny version (seconds) for smoke tests; not the study.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@debug_option
def demo(out_dir: str, device: str, quick: bool, quiet: bool) -> None:
    """Train the same 6-layer MLP with and without BatchNorm on scikit-learn's digits with SGD, saving checkpoints
    at log-spaced steps; analyse every checkpoint on the whole data set (float64 Lanczos); write OUT/nobn.h5,
    OUT/bn.h5, density, evolution and overlap figures, and OUT/summary.md with the contrast table."""
    from dataclasses import replace

    from hessspec.cli.analyze import _Reporter
    from hessspec.demo import DemoConfig, format_table, run_demo

    tune_allocator_for(device)
    config = replace(DemoConfig.quick() if quick else DemoConfig(), device=device)
    reporters: list[_Reporter] = []

    def observer(name: str):
        reporters.append(_Reporter(f"{out_dir}/{name}.h5", quiet))
        return reporters[-1].observer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        try:
            table = run_demo(out_dir, config, echo=lambda s: click.echo(s, err=True), observer_factory=observer)
        finally:
            for r in reporters:
                r.progress.clear()
    click.echo(format_table(table))
    click.echo(f"figures and results in {out_dir}/ (density_*.png, evolution.png, overlap_*.png, *.h5)")
