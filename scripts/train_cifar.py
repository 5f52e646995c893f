#!/usr/bin/env python
"""Train a CIFAR ResNet of the zoo on CIFAR-10 and save checkpoints spread over training (dense early).

The setting of He et al. (2016, Sec. 4.2), which Ghorbani et al. (2019) analyse with and without BatchNorm: SGD
with momentum 0.9, weight decay 1e-4, batches of 128, 64,000 steps, the learning rate divided by 10 at 50% and
75% of training (32k and 48k steps), random 32x32 crops of the 4-pixel zero-padded image and horizontal flips.
Analysis uses the un-augmented training set (``hessspec analyze --data cifar10:ROOT``); training reads the same
normalised images (``hessspec.data.datasets.load_dataset``), so both see identical inputs.

Networks without BatchNorm. The zoo's ``cifar-resnet32-nobn`` at He initialisation has logits of standard
deviation ~200 and a loss of ~260 (the residual branches compound the variance over 15 blocks; BN removes it).
Plain SGD at a small rate still diverges (lr 0.01 without warm-up: NaN within 5 steps, measured), and a short
warm-up is not enough (lr 0.02 after 100 warm-up steps: NaN; lr 0.01 after 100: stuck at chance). So networks
without BN train with ``--nobn-lr`` (default 0.01, 10x below the BN rate) and a linear warm-up over
``--nobn-warmup`` steps (default 1000, 2.5 epochs), which was stable and learning in the same measurement; the
initialisation is the zoo's own, so step 0 is the network the analysis builds. Networks with BN use ``--lr``
without warm-up. scripts/README.md gives the measurements behind these defaults.

Checkpoints ``OUT/ckpt_<step>.pt`` hold ``{"model": state_dict, "step": step}`` at steps 0, F, 2F, 4F, ... (F =
``--first-checkpoint``, default 100, as in the paper's dense early sampling) and the last step, plus
``--extra-checkpoints``. ``OUT/last.pt`` holds the model, the optimizer state and the step: rerunning the same
command resumes from it, bit for bit on the CPU (the batch order and the augmentation of step s are drawn from
generators seeded with (seed, epoch) and (seed, s)). Analyse the checkpoints with a glob such as
``"OUT/ckpt_*.pt"`` (not the directory, which also holds last.pt).

Example::

    python scripts/train_cifar.py --data ~/data/cifar10 --model cifar-resnet32 --out runs/cifar10/bn
    python scripts/train_cifar.py --data ~/data/cifar10 --model cifar-resnet32-nobn --out runs/cifar10/nobn
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Settings that must match for a resume to continue the same run (the others, e.g. the device, may change).
RESUME_KEYS = (
    "model",
    "steps",
    "batch_size",
    "lr",
    "warmup",
    "momentum",
    "weight_decay",
    "milestones",
    "gamma",
    "seed",
    "augment",
    "data",
)
HE_2016 = {"steps": 64_000, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}


class TrainingError(RuntimeError):
    """Training cannot start, resume or continue; the message says why."""


def checkpoint_steps(total: int, first: int, extra: list[int]) -> list[int]:
    """0, first, 2 first, 4 first, ... below ``total``, then ``total``, plus ``extra`` (within 0..total)."""
    steps = {0, total}
    if first > 0:
        step = first
        while step < total:
            steps.add(step)
            step *= 2
    steps.update(s for s in extra if 0 <= s <= total)
    return sorted(steps)


def learning_rate(step: int, base: float, warmup: int, milestones: list[int], gamma: float) -> float:
    """Linear warm-up over ``warmup`` steps, then ``base`` times ``gamma`` per milestone passed."""
    lr = base * gamma ** sum(step >= m for m in milestones)
    if warmup > 0 and step < warmup:
        lr *= (step + 1) / warmup
    return lr


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded images and horizontal flips, batched on the images' device.

    Zero padding of normalised images pads with the mean colour, as padding before normalisation nearly does.
    """
    b, _, h, w = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(images.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (offsets[0][:, None] + torch.arange(h, device=images.device))[:, :, None]  # [b, h, 1]
    cols = (offsets[1][:, None] + torch.arange(w, device=images.device))[:, None, :]  # [b, 1, w]
    cols = torch.where(flips[:, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = f"--device {spec}: CUDA is not available here; use --device cpu or auto"
        raise TrainingError(msg)
    return device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Defaults follow He et al. (2016, Sec. 4.2); see the module docstring for the no-BN choices.",
    )
    parser.add_argument("--data", required=True, help="CIFAR-10 root (holding cifar-10-batches-py/); never downloads")
    parser.add_argument("--out", required=True, type=Path, help="directory for ckpt_<step>.pt and last.pt")
    parser.add_argument("--model", default="cifar-resnet32", help="zoo name, e.g. cifar-resnet32(-nobn), -resnet20")
    parser.add_argument("--steps", type=int, default=HE_2016["steps"], help="SGD steps in total")
    parser.add_argument("--batch-size", type=int, default=HE_2016["batch_size"], help="examples per SGD step")
    parser.add_argument("--lr", type=float, default=HE_2016["lr"], help="learning rate of networks with BN")
    parser.add_argument("--nobn-lr", type=float, default=0.01, help="learning rate of networks without BN")
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps of networks with BN")
    parser.add_argument("--nobn-warmup", type=int, default=1000, help="linear warm-up steps of networks without BN")
    parser.add_argument("--momentum", type=float, default=HE_2016["momentum"])
    parser.add_argument("--weight-decay", type=float, default=HE_2016["weight_decay"])
    parser.add_argument(
        "--milestones", default="0.5,0.75", help="fractions of --steps (or step numbers >= 1) where the lr drops"
    )
    parser.add_argument("--gamma", type=float, default=0.1, help="lr factor at each milestone")
    parser.add_argument(
        "--first-checkpoint", type=int, default=100, help="checkpoints at 0, F, 2F, 4F, ... and the end"
    )
    parser.add_argument("--extra-checkpoints", default="", help="more checkpoint steps, comma-separated")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between resume states (last.pt)")
    parser.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this session after this many steps (a job's time limit); rerun the command to continue",
    )
    parser.add_argument("--no-augment", action="store_true", help="train on the un-augmented images")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:I")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation, batch order, augmentation")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "save_every", "log_every", "stop_after"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.first_checkpoint < 0 or args.warmup < 0 or args.nobn_warmup < 0:
        parser.error("--first-checkpoint and the warm-ups must be >= 0")
    try:
        args.milestone_steps = sorted(
            {round(float(m) * args.steps) if float(m) < 1 else int(float(m)) for m in args.milestones.split(",") if m}
        )
        args.extra = [int(s) for s in args.extra_checkpoints.split(",") if s.strip()]
    except ValueError as error:
        parser.error(f"--milestones/--extra-checkpoints: {error}")
    return args


def _settings(args: argparse.Namespace, batch_norm: bool) -> dict[str, Any]:
    return {
        "model": args.model,
        "batch_norm": batch_norm,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr if batch_norm else args.nobn_lr,
        "warmup": args.warmup if batch_norm else args.nobn_warmup,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "milestones": args.milestone_steps,
        "gamma": args.gamma,
        "seed": args.seed,
        "augment": not args.no_augment,
        "data": "cifar10",
    }


def _resume(path: Path, settings: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file: say which, do not silently restart
        msg = f"cannot resume from {path}: {type(error).__name__}: {error}; delete it to start over"
        raise TrainingError(msg) from error
    stored = state.get("settings", {})
    diffs = {k: (stored.get(k), settings[k]) for k in RESUME_KEYS if stored.get(k) != settings[k]}
    if diffs:
        shown = ", ".join(f"{k} ({a!r} stored, {b!r} now)" for k, (a, b) in diffs.items())
        msg = f"{path} belongs to a run with other settings: {shown}; use another --out or the same settings"
        raise TrainingError(msg)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def train(args: argparse.Namespace) -> list[Path]:
    """Run (or resume) training; returns the checkpoint files of the run ([] when stopped by --stop-after)."""
    from hessspec.data.datasets import load_dataset
    from hessspec.models import build_model

    device = _device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution once
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(device)
    batch_norm = has_batch_norm(model)
    settings = _settings(args, batch_norm)
    inputs, labels = load_dataset(f"cifar10:{args.data}").tensors
    if len(inputs) < args.batch_size:
        msg = f"--batch-size {args.batch_size} exceeds the {len(inputs)} training images"
        raise TrainingError(msg)
    inputs, labels = inputs.to(device), labels.to(device)
    steps_per_epoch = len(inputs) // args.batch_size  # the remainder of each epoch is dropped

    opt = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=args.momentum, weight_decay=args.weight_decay)
    args.out.mkdir(parents=True, exist_ok=True)
    last = args.out / "last.pt"
    if last.exists():
        start = _resume(last, settings, model, opt)
    elif any(args.out.glob("ckpt_*.pt")):
        msg = f"{args.out} holds checkpoints but no last.pt to resume from; train into an empty directory"
        raise TrainingError(msg)
    else:
        start = 0
    (args.out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    save_at = checkpoint_steps(args.steps, args.first_checkpoint, args.extra)
    print(
        f"{args.model} ({'with' if batch_norm else 'without'} BN, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters) on {len(inputs):,} images, {device}: steps {start}..{args.steps}, lr {settings['lr']} "
        f"(warm-up {settings['warmup']}, x{args.gamma} at {args.milestone_steps}); checkpoints at {save_at}",
        flush=True,
    )

    def save_state(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "settings": settings}
        _atomic_save(state, last)

    started = time.monotonic()
    model.train()
    order = None
    with open(args.out / "train_log.csv", "a") as log:
        if log.tell() == 0:
            log.write("step,lr,loss,batch_accuracy,seconds\n")
        for step in range(start, args.steps + 1):
            checkpoint = args.out / f"ckpt_{step:06d}.pt"
            if step in save_at and not checkpoint.exists():
                _atomic_save({"model": model.state_dict(), "step": step}, checkpoint)
                save_state(step)  # so that every checkpoint on disk precedes the resume point
            if step == args.steps:
                break
            if args.stop_after is not None and step - start >= args.stop_after:
                save_state(step)
                print(f"stopping after {args.stop_after} steps at step {step}; rerun to continue", flush=True)
                return []
            epoch, position = divmod(step, steps_per_epoch)
            if position == 0 or order is None:
                order = torch.randperm(len(inputs), generator=_generator(args.seed, epoch)).to(device)
            index = order[position * args.batch_size : (position + 1) * args.batch_size]
            x, y = inputs[index], labels[index]
            if settings["augment"]:
                x = augment(x, _generator(args.seed, 1_000_000 + step))
            lr = learning_rate(step, settings["lr"], settings["warmup"], args.milestone_steps, args.gamma)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                loss_value = float(loss.detach())  # one host sync per log line, not per step
                if not math.isfinite(loss_value):
                    msg = (
                        f"training diverged at step {step} (loss {loss_value}); lower the learning rate "
                        f"({'--lr' if batch_norm else '--nobn-lr'}) or lengthen the warm-up"
                    )
                    raise TrainingError(msg)
                accuracy = float((logits.argmax(1) == y).float().mean())
                elapsed = time.monotonic() - started
                log.write(f"{done},{lr:.6g},{loss_value:.6g},{accuracy:.4f},{elapsed:.1f}\n")
                log.flush()
                print(f"step {done:>7}  lr {lr:.4g}  loss {loss_value:.4f}  batch acc {accuracy:.3f}", flush=True)
            if done % args.save_every == 0:
                save_state(done)
    return [args.out / f"ckpt_{s:06d}.pt" for s in save_at]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = train(args)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not paths:
        return 0
    print(f'done: {len(paths)} checkpoints in {args.out} (analyse "{args.out}/ckpt_*.pt")', flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
