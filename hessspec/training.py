"""A small, deterministic SGD trainer that writes real checkpoints (used by the demo and the tests).

Checkpoints are ``torch.save`` files holding ``{"model": state_dict, "step": step}``, the layout
:func:`hessspec.checkpoints.load_checkpoint` reads safely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def train_sgd(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    save_steps: Sequence[int],
    out_dir: str | Path,
    *,
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    on_save: Callable[[int, float], None] | None = None,
) -> list[Path]:
    """Train ``model`` with plain SGD on shuffled mini-batches and save checkpoints at ``save_steps``.

    Args:
        model: the network (trained in place, in train mode).
        inputs, targets: the training set (on the model's device).
        save_steps: steps after which to save (0 is the initialisation); the last one ends training.
        out_dir: directory for ``ckpt_<step>.pt`` files (created).
        lr, batch_size, seed: SGD settings; the batch order comes from a generator seeded with ``seed``.
        on_save: called as ``on_save(step, loss_of_last_batch)`` after each save.

    Returns:
        The checkpoint paths, in step order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save = sorted(set(int(s) for s in save_steps))
    if not save or save[0] < 0:
        msg = f"save_steps must be non-negative and non-empty; got {list(save_steps)}"
        raise ValueError(msg)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    paths: list[Path] = []
    loss_value = float("nan")
    order = torch.randperm(len(inputs), generator=gen)
    cursor = 0
    for step in range(save[-1] + 1):
        if step in save:
            path = out / f"ckpt_{step:06d}.pt"
            torch.save({"model": model.state_dict(), "step": step}, path)
            paths.append(path)
            if on_save is not None:
                on_save(step, loss_value)
        if step == save[-1]:
            break
        if cursor + batch_size > len(inputs):
            order = torch.randperm(len(inputs), generator=gen)
            cursor = 0
        idx = order[cursor : cursor + batch_size].to(inputs.device)
        cursor += batch_size
        loss = F.cross_entropy(model(inputs[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
    return paths
