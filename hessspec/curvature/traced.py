"""Traced forward-over-reverse products: the primal split from the tangents, and kept across passes.

Under the "traced" block strategy a batch's product ``(theta, v) -> (g_b, H_b v)`` (``jvp`` of ``grad``, as under
"vmap") is traced once per batch structure with ``make_fx`` into a graph of aten operations, and the graph is cut in
two along its dependence on ``v``:

* the **primal** graph ``(theta, scale, batch) -> (g_b, saved)`` computes everything that does not depend on ``v``:
  the forward pass, the gradient, and the intermediates the tangents read (activations, ReLU and pooling masks,
  batch statistics) — once per batch and pass, however many columns the pass has;
* the **tangent** graph ``(saved, v) -> H_b v`` is everything else. It is linear in ``v`` and is evaluated once per
  column (on the CPU, where a column at a time is as fast as a vectorised block and holds one column's tangents) or
  vectorised over the block's columns with ``vmap`` (on a GPU).

The operations are those of the eager ``jvp`` of ``grad``, in the same order, so a column's product equals the eager
one exactly (``tests/test_traced.py``; a zero's sign aside, see below). Two rewrites make the graphs cheaper without
changing a value: the same sub-expression traced twice (the jvp's primal recomputes part of the forward pass) is
evaluated once, and an addition of a term that is zero by construction (the tangent of an input that has none, the
zeros a sum rule starts from, what convolutions and products make of them) is dropped with the term: ``0 + x`` is
``x`` (up to the sign of a zero).

Because ``saved`` is all the tangents need, it can be kept: the operator keeps each batch's ``saved`` across passes
while they fit in its memory budget (``primal_cache``), and a pass whose batches are all kept evaluates tangents only
and does not read the data again. Over the 90 passes of an SLQ run the primal is then paid once instead of 90 times.

Tracing is symbolic (``tracing_mode="fake"``): a model whose Python code branches on the *values* of its tensors (a
data-dependent ``if``) cannot be traced, and is not silently specialised to the first batch; the error makes the
operator fall back to another strategy (:class:`TraceError`). A graph that would mutate a tensor in place is refused
the same way, so no saved intermediate can be changed by a later operation.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

_PLAIN = (int, float, bool, str, type(None))  # batch leaves that may be baked into a graph as constants
_ASSERTS = {torch.ops.aten.is_same_size.default, torch.ops.aten._has_same_storage_numel.default}


class TraceError(RuntimeError):
    """The product could not be traced or split (data-dependent control flow, in-place mutation, ...)."""


def batch_signature(batch: Any) -> tuple:
    """What a traced graph is specialised to: the batch's structure, its tensors' shapes, dtypes and devices, and
    its non-tensor leaves."""
    leaves, spec = tree_flatten(batch)
    described = tuple(
        (tuple(x.shape), x.dtype, str(x.device)) if isinstance(x, torch.Tensor) else ("value", repr(x)) for x in leaves
    )
    return (str(spec), described)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


class TracedProduct:
    """The primal and tangent graphs of one batch structure.

    Call :meth:`primal` once per batch and pass, then :meth:`tangent` per column (or :meth:`tangents` for a block).
    """

    def __init__(self, primal: fx.GraphModule, tangent: fx.GraphModule, tensor_leaves: list[int]) -> None:
        self._primal = primal
        self._tangent = tangent
        self._tensor_leaves = tensor_leaves

    def primal(self, theta: torch.Tensor, scale: torch.Tensor, batch: Any) -> tuple[torch.Tensor, tuple]:
        """``(g_b, saved)``: the batch gradient and what the tangents read."""
        leaves, _ = tree_flatten(batch)
        g, saved = self._primal(theta, scale, *(leaves[i] for i in self._tensor_leaves))
        return g, tuple(saved)

    def tangent(self, saved: tuple, v: torch.Tensor) -> torch.Tensor:
        """``H_b v`` for one column ``v`` (contiguous, [n])."""
        return self._tangent(*saved, v)

    def tangents(self, saved: tuple, V: torch.Tensor, vectorised: bool, chunk: int | None = None) -> torch.Tensor:
        """``H_b V`` for a block ``V`` [n, p]: one column at a time, or vectorised with ``vmap`` in chunks."""
        if not vectorised or V.shape[1] == 1:
            return torch.stack([self.tangent(saved, V[:, i].contiguous()) for i in range(V.shape[1])], dim=1)
        width = chunk or V.shape[1]
        parts = [
            torch.func.vmap(lambda v: self._tangent(*saved, v), in_dims=1, out_dims=1)(V[:, s : s + width])
            for s in range(0, V.shape[1], width)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def trace_product(
    product: Callable[[torch.Tensor, torch.Tensor, Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    theta: torch.Tensor,
    scale: torch.Tensor,
    batch: Any,
) -> TracedProduct:
    """Trace ``product(theta, scale, batch, v) -> (g_b, H_b v)`` for ``batch``'s structure and split it.

    Raises:
        TraceError: tracing failed (the message says why), or the graph mutates a tensor in place.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    leaves, spec = tree_flatten(batch)
    tensor_leaves = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    opaque = [type(x).__name__ for x in leaves if not isinstance(x, (torch.Tensor, *_PLAIN))]
    if opaque:
        # A container torch's pytree does not open (e.g. a UserDict such as transformers' BatchEncoding): its
        # tensors would be baked into the graph as the first batch's constants.
        msg = f"the product could not be traced: the batch holds a {opaque[0]}, which torch's pytree does not open"
        raise TraceError(msg)

    def flat(theta_: torch.Tensor, scale_: torch.Tensor, v: torch.Tensor, *tensors: torch.Tensor):
        filled = list(leaves)
        for i, t in zip(tensor_leaves, tensors, strict=True):
            filled[i] = t
        return product(theta_, scale_, tree_unflatten(filled, spec), v)

    v0 = torch.zeros_like(theta)
    try:
        # Functionalised: in-place operations become out-of-place ones, so no operation can change a saved tensor.
        functional = torch.func.functionalize(flat, remove="mutations")
        gm = make_fx(functional, tracing_mode="fake")(theta, scale, v0, *(leaves[i] for i in tensor_leaves))
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
        raise TraceError(f"the product could not be traced: {reason}") from error
    primal, tangent = _split(gm)
    return TracedProduct(primal, tangent, tensor_leaves)


def _split(gm: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule]:
    graph = gm.graph
    for node in list(graph.nodes):  # the eager jvp's shape assertions: no value, no use
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten.view.default:
            # The same memory as a view where a view is possible; also valid on vmap's batched tangents.
            node.target = torch.ops.aten.reshape.default
    _drop_zero_additions(graph)
    _drop_identity_copies(graph)
    graph.eliminate_dead_code()
    mutating = [str(n.target) for n in graph.nodes if n.op == "call_function" and _mutates(n)]
    if mutating:
        msg = f"the traced product mutates tensors in place ({', '.join(sorted(set(mutating))[:3])})"
        raise TraceError(msg)

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    theta_node, scale_node, v_node, *leaf_nodes = placeholders
    output = next(n for n in graph.nodes if n.op == "output")
    g_node, hv_node = output.args[0]

    tangent: set[fx.Node] = {v_node}
    for node in graph.nodes:
        if node.op == "call_function" and any(a in tangent for a in node.all_input_nodes):
            tangent.add(node)
    saved: list[fx.Node] = []
    for node in graph.nodes:
        if node in tangent:
            saved.extend(a for a in node.all_input_nodes if a not in tangent and a not in saved)
    if hv_node not in tangent and hv_node not in saved:  # the loss is at most linear: H_b v is a constant zero
        saved.append(hv_node)

    primal_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in tangent or node.op == "output":
            continue
        if node is v_node:
            continue
        env[node] = primal_graph.node_copy(node, lambda a: env[a])
    primal_graph.output((env[g_node], tuple(env[a] for a in saved)))

    tangent_graph = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {a: tangent_graph.placeholder(f"saved_{i}") for i, a in enumerate(saved)}
    tenv[v_node] = tangent_graph.placeholder("v")
    for node in graph.nodes:
        if node in tangent and node is not v_node:
            tenv[node] = tangent_graph.node_copy(node, lambda a: tenv[a])
    tangent_graph.output(tenv[hv_node])

    primal = fx.GraphModule(gm, primal_graph)
    primal.graph.eliminate_dead_code()
    primal = _common_subexpressions(primal)
    del theta_node, scale_node, leaf_nodes
    return primal, fx.GraphModule(gm, tangent_graph)


_ZEROS = {
    torch.ops.aten.zeros.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten._new_zeros_with_same_feature_meta.default,
}


def _same_meta(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (
        isinstance(va, torch.Tensor)
        and isinstance(vb, torch.Tensor)
        and va.shape == vb.shape
        and va.dtype == vb.dtype
        and va.device == vb.device
    )


def _zero_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is all zeros by construction: zeros made by the differentiation rules (a tangent or a
    gradient that does not exist), and what products, reshapes and convolutions make of them."""
    aten = torch.ops.aten
    reshaping = {
        aten.reshape.default,
        aten.view.default,
        aten.t.default,
        aten.permute.default,
        aten.expand.default,
        aten.clone.default,
        aten.alias.default,
        aten._to_copy.default,
        aten.transpose.int,
        aten.neg.default,
    }
    products = {aten.mm.default, aten.bmm.default, aten.mul.Tensor}
    zero: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        args = node.args
        if node.target in _ZEROS:
            zero.add(node)
        elif node.target in reshaping and args and args[0] in zero:
            zero.add(node)
        elif node.target in products and any(a in zero for a in args[:2]):
            zero.add(node)
        elif node.target is aten.threshold_backward.default and args[0] in zero:
            zero.add(node)
        elif node.target is aten.convolution.default and args[2] is None and (args[0] in zero or args[1] in zero):
            zero.add(node)
        elif node.target is operator.getitem and args[0].op == "call_function":
            source, index = args
            if source.target is aten.convolution_backward.default:
                grad_output, inputs, weight = source.args[:3]
                factors = {0: (grad_output, weight), 1: (grad_output, inputs), 2: (grad_output,)}.get(index, ())
                if any(f in zero for f in factors):
                    zero.add(node)
    return zero


def _drop_zero_additions(graph: fx.Graph) -> None:
    """``zeros + x`` (the sum rules of forward and reverse mode start from zeros, or add a term of a tangent that
    does not exist, such as the input's) is ``x``: the addition goes, and the zero term with it when nothing else
    reads it. Only where nothing is broadcast or promoted; the graph is functional, so using ``x`` itself in the
    sum's place changes no value."""
    zero = _zero_nodes(graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.add.Tensor or node.kwargs:
            continue
        if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        a, b = node.args
        for term, other in ((a, b), (b, a)):
            if term in zero and _same_meta(node, other):
                node.replace_all_uses_with(other)
                graph.erase_node(node)
                break


def _drop_identity_copies(graph: fx.Graph) -> None:
    """An ``expand`` to the shape a tensor has, and a ``_to_copy`` to the dtype, device and layout it has (the sum
    rules of batch norm's derivatives make both, copying whole activations per column) are the tensor itself: the
    graph is functional, so nothing can tell the copy from the original."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        value, before = node.meta.get("val"), source.meta.get("val")
        if not (isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor)):
            continue
        same = value.shape == before.shape and value.dtype == before.dtype and value.device == before.device
        if node.target is aten.expand.default and same and not node.kwargs:
            node.replace_all_uses_with(source)
        elif node.target is aten._to_copy.default and same and len(node.args) == 1:
            if set(node.kwargs) <= {"dtype", "layout", "device"} and node.kwargs.get("layout", torch.strided) in (
                torch.strided,
                before.layout,
            ):
                node.replace_all_uses_with(source)


def _common_subexpressions(gm: fx.GraphModule) -> fx.GraphModule:
    from torch.fx.passes.dialect.common.cse_pass import CSEPass

    result = CSEPass()(gm)
    module = result.graph_module
    module.recompile()
    return module
