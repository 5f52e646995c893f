"""Parameter blocks: named groups of parameters whose diagonal blocks ``M_bb`` of a curvature matrix are analysed.

A block spec (``--blocks``, repeatable) is one of

- ``tensors``: one block per parameter tensor, named after it (``layers.0.weight``);
- ``modules``: one block per module that holds parameters directly, named after the module (``layers.0``; the
  parameters of the root module itself form the block ``(root)``);
- ``NAME=REGEX``: the block ``NAME`` holds the parameters whose names match ``REGEX`` (``re.search``).

Specs are combined; parameters that no block holds are left out of the block analysis (the whole-model result
"all" still spans every selected parameter). Two blocks holding the same parameter, a block holding none, a
repeated block name and the reserved name "all" are errors.

``M_bb V_b`` is computed as rows ``b`` of ``M [V_b; 0]``: each block's vectors are embedded, zero-padded, as
columns of the whole-model block, so all blocks share the whole model's pass over the data (more columns, not
more passes). Probes of block ``b`` depend on (seed, block name, probe index) only (:func:`block_probes`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

WHOLE = "all"  # the name of the whole selected parameter set; no block may take it
ROOT = "(root)"  # the block of parameters held by the root module itself (``--blocks modules``)


class BlockError(ValueError):
    """A block spec that cannot be used (syntax, an empty or overlapping group, a reserved or repeated name)."""


@dataclass(frozen=True)
class Block:
    """A named group of parameters and where its entries lie in the flat parameter vector.

    Attributes:
        name: the block's name (never "all").
        params: names of its parameters, in the operator's order.
        index: int64 [n_b] positions of its entries in the flat parameter vector (ascending).
    """

    name: str
    params: tuple[str, ...]
    index: torch.Tensor

    @property
    def n(self) -> int:
        """Number of entries (the dimension of the diagonal block)."""
        return int(self.index.numel())

    def embed(self, V: torch.Tensor, n: int) -> torch.Tensor:
        """``V`` [n_b, p] as rows of an otherwise zero [n, p] block."""
        out = V.new_zeros((n, V.shape[1]))
        out[self.index.to(V.device)] = V
        return out

    def restrict(self, W: torch.Tensor) -> torch.Tensor:
        """The block's rows of ``W`` ([n, ...] -> [n_b, ...])."""
        return W[self.index.to(W.device)]


def check_block_specs(specs: Sequence[str]) -> tuple[str, ...]:
    """Check the syntax of block specs (before any model exists).

    Args:
        specs: ``tensors``, ``modules`` or ``NAME=REGEX`` strings.

    Returns:
        The specs, stripped.

    Raises:
        BlockError: an unknown spec, an empty or reserved name, an invalid regular expression, a repeated name.
    """
    out, names = [], set()
    for raw in specs:
        spec = str(raw).strip()
        if spec in ("tensors", "modules"):
            if spec in out:
                msg = f"--blocks {spec} is given twice"
                raise BlockError(msg)
            out.append(spec)
            continue
        name, eq, pattern = spec.partition("=")
        name = name.strip()
        if not eq or not name or not pattern:
            msg = f"--blocks {raw!r}: expected tensors, modules or NAME=REGEX"
            raise BlockError(msg)
        if name == WHOLE:
            msg = f"--blocks {raw!r}: the name {WHOLE!r} is reserved for the whole parameter set"
            raise BlockError(msg)
        if name in names:
            msg = f"--blocks: the block name {name!r} is given twice"
            raise BlockError(msg)
        try:
            re.compile(pattern)
        except re.error as error:
            msg = f"--blocks {raw!r}: {pattern!r} is not a valid regular expression: {error}"
            raise BlockError(msg) from None
        names.add(name)
        out.append(f"{name}={pattern}")
    return tuple(out)


def _groups(spec: str, params: Sequence[str]) -> list[tuple[str, list[str]]]:
    if spec == "tensors":
        return [(name, [name]) for name in params]
    if spec == "modules":
        groups: dict[str, list[str]] = {}
        for name in params:
            module = name.rpartition(".")[0] or ROOT
            groups.setdefault(module, []).append(name)
        return list(groups.items())
    name, _, pattern = spec.partition("=")
    compiled = re.compile(pattern)
    return [(name.strip(), [p for p in params if compiled.search(p)])]


def resolve_blocks(specs: Sequence[str], params: Sequence[str], numels: Sequence[int]) -> list[Block]:
    """The blocks named by ``specs`` over the selected parameters.

    Args:
        specs: block specs (see the module docstring).
        params: names of the selected parameters, in the order of the flat parameter vector.
        numels: their numbers of entries.

    Returns:
        The blocks, in the order of the specs (and of the parameters within ``tensors`` and ``modules``).

    Raises:
        BlockError: a bad spec, a block that holds no selected parameter, a parameter held by two blocks, a block
            name used twice or equal to "all".
    """
    specs = check_block_specs(specs)
    offsets = np.concatenate([[0], np.cumsum(numels)]).astype(np.int64)
    position = {name: i for i, name in enumerate(params)}
    owner: dict[str, str] = {}
    blocks: list[Block] = []
    for spec in specs:
        for name, members in _groups(spec, params):
            if not members:
                shown = ", ".join(params[:5])
                msg = f"--blocks {spec!r}: the block {name!r} matches no selected parameter (they are e.g. {shown})"
                raise BlockError(msg)
            if name == WHOLE:
                msg = f"--blocks {spec!r}: a block may not be named {WHOLE!r} (it names the whole parameter set)"
                raise BlockError(msg)
            if any(b.name == name for b in blocks):
                msg = f"--blocks: two blocks are named {name!r}"
                raise BlockError(msg)
            for member in members:
                if member in owner:
                    msg = f"--blocks: parameter {member!r} is in two blocks, {owner[member]!r} and {name!r}"
                    raise BlockError(msg)
                owner[member] = name
            ordered = sorted(members, key=position.__getitem__)
            index = np.concatenate([np.arange(offsets[position[m]], offsets[position[m] + 1]) for m in ordered])
            blocks.append(Block(name, tuple(ordered), torch.from_numpy(index)))
    return blocks


def _probe_seed(seed: int, block: str, probe: int) -> int:
    digest = hashlib.sha256(f"hessspec-block-probe/{int(seed)}/{block}/{int(probe)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_probes(n: int, probes: int, seed: int, block: str) -> torch.Tensor:
    """Normalised Rademacher probes of a block, float64 [n, probes] on the CPU.

    Probe ``i`` is drawn from a CPU generator seeded by a hash of (seed, block name, i): it does not change when
    other blocks, other probes or other curvatures are analysed alongside.
    """
    columns = []
    for i in range(probes):
        gen = torch.Generator().manual_seed(_probe_seed(seed, block, i))
        columns.append(torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1)
    return torch.stack(columns, dim=1) / np.sqrt(n)


def restart_seeds(seed: int, block: str, probes: int, gradient_chain: bool = False) -> list[int]:
    """Seeds of the Lanczos restart vectors of a block's chains (one per probe, then the gradient chain's).

    Chain ``i``'s seed is a hash of (seed, block name, i) alone, so its restarts do not change with the number of
    probes or with the chains that run beside it.
    """
    seeds = [_probe_seed(seed, block, -1 - i) for i in range(probes)]
    return seeds + ([_probe_seed(seed, f"{block}/gradient", -1)] if gradient_chain else [])
