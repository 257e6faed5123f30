"""Every place where memguard replaces torch's fake-tensor behaviour, each with its reason.

Fake tensors know shapes, not values. Three kinds of operators need more than torch's fake kernels give:

1. Kernels whose fake registration is stricter than the real CPU kernel: ``aten._grouped_mm`` (the MoE
   grouped GEMM) insists on bfloat16 in its meta function, while the CPU kernel trains float32 (and
   float16) fine and the output's shape never depends on the routing. :func:`_grouped_mm` computes the
   same shape in the input's dtype.
2. Values that come from the example batch (padding masks, label masks, lengths) or from constants the
   model builds (``torch.arange``, causal masks): these are *known*. The fake mode carries them as
   FakeTensor constants (:class:`KnownValuesMode`) and torch's own constant propagation computes every
   operator whose inputs are all known on the real values, so ``nonzero``, boolean masks, ``.item()``
   and ``torch.equal`` on them are exact.
3. Values computed from the weights (routing decisions), which no fake trace can know. memguard makes an
   explicit assumption, written into ``Estimate.notes``:

   - routing indices (``topk`` / ``argmax`` / ``max(dim)`` of unknown scores) are *balanced*: row ``r``
     picks experts ``r*k .. r*k+k-1`` modulo the number of experts. The indices become known values,
     so everything downstream (one-hot masks, ``torch.where``, ``histc`` offsets, per-expert loops) is
     traced exactly for that routing. For the bound, :func:`routing` ``("skewed")`` traces again with
     every token routed to the last expert (among its ``k`` choices) and every expert still used: the
     expert a loop runs last (and backward first) holds every token while the saved rows of all experts
     add up to the same total, the worst balance for per-expert transients. Routers with a capacity
     (top-1, Switch style) drop what an expert cannot take, so there the skewed routing keeps fewer rows;
     a real routing that keeps every token *and* gives the last expert more than its balanced share can
     then sit above both, by that expert's transients for the extra rows (+0.06% measured on a random
     routing of a capacity-1.25 top-1 model). This is the one known gap in the bound.
   - ``nonzero`` / ``masked_select`` / boolean indexing / ``unique`` on unknown values: every element is
     taken as selected (the output is as large as the input allows), an upper bound.
   - ``.item()`` / ``bool()`` / ``torch.equal`` on unknown values: True (1, 1.0): the branch taken when a
     condition holds.

The rules run from the recording dispatch mode through one dict lookup per operator (:data:`RULES`), so
ordinary operators pay nothing else.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._mode_utils import no_dispatch
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

KNOWN_NUMEL_LIMIT = 1 << 22
"""Known values are kept for tensors up to this many elements (4M: a 2048 x 2048 mask). Larger ones
become ordinary fakes, whose data-dependent uses fall back to the assumptions above."""

BALANCED = "balanced"
SKEWED = "skewed"
_routing: contextvars.ContextVar[str] = contextvars.ContextVar("memguard_routing", default=BALANCED)


@contextlib.contextmanager
def routing(kind: str) -> Iterator[None]:
    """Trace with routing assumption ``kind`` (:data:`BALANCED` or :data:`SKEWED`)."""
    token = _routing.set(kind)
    try:
        yield
    finally:
        _routing.reset(token)


class KnownValuesMode(FakeTensorMode):
    """A FakeTensorMode whose constants may be larger than one element.

    torch keeps a real value beside a fake tensor only for scalars; memguard keeps it for tensors up to
    :data:`KNOWN_NUMEL_LIMIT` elements so masks and lengths from the batch stay known through the
    operators that use only them (torch computes those on the real values)."""

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return (t.numel() <= KNOWN_NUMEL_LIMIT and t.layout == torch.strided and not self.is_our_fake(t)
                and t.device.type != "meta")


def fake_mode() -> FakeTensorMode:
    return KnownValuesMode(allow_non_fake_inputs=False)


def known(t: Any) -> bool:
    """Whether fake ``t`` carries its real value."""
    return isinstance(t, FakeTensor) and t.constant is not None


def fake_leaf(x: torch.Tensor, mode: FakeTensorMode, dtype: torch.dtype | None) -> torch.Tensor:
    """A fake of batch tensor ``x`` (floating ones in ``dtype``), carrying a copy of its values when they
    are readable (a real tensor, small enough): the batch's masks and lengths are then known exactly.
    The copy has the fake's exact layout, and the user's tensor is never written to."""
    target = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
    if isinstance(mode, KnownValuesMode) and _readable(x):
        with no_dispatch():
            real = torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=target, device="cpu")
            real.copy_(x.detach())
        return mode.fake_tensor_converter.from_real_tensor(mode, real, make_constant=True)
    with mode:
        return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=target, device="cpu")


def value_key(x: torch.Tensor) -> int | None:
    """A digest of the values :func:`fake_leaf` makes known (None when it keeps none): two batches that
    differ only in them (another padding mask) trace differently."""
    if not _readable(x):
        return None
    with no_dispatch():
        return hash(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()) if x.numel() else 0


def _readable(x: torch.Tensor) -> bool:
    return (x.device.type != "meta" and x.layout == torch.strided and x.numel() <= KNOWN_NUMEL_LIMIT
            and type(x) in (torch.Tensor, torch.nn.Parameter))


# ---------------------------------------------------------------------------------------------------------
# The rules


class Assumptions:
    """What one trace assumed, in words, and the routing it assumes (read when the trace starts)."""

    def __init__(self) -> None:
        self.routing = _routing.get()
        self.notes: list[str] = []
        self.routed = False

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


Rule = Callable[[Assumptions, Any, tuple, dict], Any]


def _grouped_mm(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    """torch's meta kernel for ``_grouped_mm`` accepts only bfloat16 (its CUDA kernel's rule) while the CPU
    kernel runs float32 and float16 too. The output shape follows from the operands alone (2d x 3d:
    rows x N; 3d x 2d: rows x N; 2d x 2d, the weight gradient: groups x M x N), contiguous on the CPU;
    measured, the float32 CPU kernel allocates its output and nothing else."""
    mat_a, mat_b = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    out_dtype = (args[4] if len(args) > 4 else kwargs.get("out_dtype")) or mat_a.dtype
    if mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16:
        return func(*args, **kwargs)
    torch._check(mat_a.dtype == mat_b.dtype, lambda: f"_grouped_mm: {mat_a.dtype} x {mat_b.dtype}")
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        shape = [offs.size(0), mat_a.size(0), mat_b.size(1)]
    elif mat_a.dim() == 2:
        shape = [mat_a.size(0), mat_b.size(-1)]
    elif mat_b.dim() == 2:
        shape = [mat_a.size(1), mat_b.size(1)]
    else:
        shape = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    return torch.empty(shape, dtype=out_dtype, device=mat_a.device)


_FACTORY_NAMES = ("arange.default", "arange.start", "arange.start_step", "full.default", "zeros.default",
                  "ones.default", "scalar_tensor.default", "eye.default", "eye.m", "linspace.default",
                  "tril_indices.default", "triu_indices.default")


def _factory(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    """Constants the model builds (positions, causal masks) are known: small enough, they are computed for
    real beside the fake, so comparisons with them (nn.Transformer's causal-mask detection) are exact."""
    out = func(*args, **kwargs)
    if out.numel() > KNOWN_NUMEL_LIMIT or out.device.type != "cpu" or not isinstance(out, FakeTensor):
        return out
    with no_dispatch():
        real = func(*args, **kwargs)
    return _known_twin(out, real)


RANDOM_MEANS = {"rand": 0.5, "rand_like": 0.5, "randn": 0.0, "randn_like": 0.0}
"""Random draws small enough to be read by Python (LayerDrop's ``torch.rand([]) < p``) carry their
distribution's mean: the most likely outcome of a threshold test, the same in every trace. A draw against
a small drop probability then keeps the layer, as nearly every real step does; a silent True (skip the
layer) under-predicted every LayerDrop model by the skipped layers."""

RANDOM_READ_LIMIT = 1024
"""Larger random tensors (noise, masks) are never read as values: they stay plain fakes."""


def _random_mean(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if out.numel() > RANDOM_READ_LIMIT or out.device.type != "cpu" or not isinstance(out, FakeTensor):
        return out
    mean = RANDOM_MEANS[func.overloadpacket.__name__]
    ctx.note("assumed: small random draws read as values take their mean (torch.rand 0.5, torch.randn 0), so "
             "a test against a drop probability such as LayerDrop's keeps the layer, as almost every step does")
    with no_dispatch():
        real = torch.full(tuple(out.shape), mean, dtype=out.dtype)
    return _known_twin(out, real)


def _known_twin(fake: FakeTensor, real: torch.Tensor) -> FakeTensor:
    """A fake like ``fake`` that carries ``real``. Made through the fake mode's converter, so views of the
    real value (slices written in place, transposes) map to views of this fake's storage."""
    mode = fake.fake_mode
    return mode.fake_tensor_converter.from_real_tensor(mode, real, make_constant=True)


def _routing_indices(rows: int, choices: int, k: int, kind: str) -> torch.Tensor:
    """(rows, k) expert indices, distinct within a row.

    Balanced: row ``r`` picks ``r*k .. r*k+k-1`` modulo ``choices``. Skewed: every row picks the last expert
    (which a loop over experts runs last, and backward first) and its other ``k - 1`` choices round-robin
    over the rest, so every expert is still used (its gradients and optimizer state exist, as in a real
    run) while one expert holds every token; with ``k = 1`` the first ``choices - 1`` rows keep one token
    on each other expert."""
    r = torch.arange(rows)[:, None]
    if kind != SKEWED or choices < 2:
        return (r * k + torch.arange(k)[None, :]) % choices
    last = torch.full((rows, 1), choices - 1)
    if k == 1:
        return torch.where(r < choices - 1, r, last)
    others = (r * (k - 1) + torch.arange(k - 1)[None, :]) % (choices - 1)
    return torch.cat([others, last], 1)


def _routed(ctx: Assumptions, values: torch.Tensor, indices: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """``indices`` (a fake from scores nobody can know) as known routing values."""
    if not isinstance(indices, FakeTensor) or indices.numel() > KNOWN_NUMEL_LIMIT or indices.numel() == 0:
        return indices
    dim = dim % max(values.dim(), 1)
    choices = values.shape[dim] if values.dim() else 1
    moved = list(indices.shape)  # the shape with the choices dimension last
    if moved:
        moved.append(moved.pop(dim))
    rows = indices.numel() // max(k, 1)
    with no_dispatch():
        real = _routing_indices(rows, choices, k, ctx.routing).reshape(moved)
        if indices.dim():
            real = real.movedim(-1, dim)
        real = torch.empty_strided(tuple(indices.shape), tuple(indices.stride()), dtype=indices.dtype).copy_(real)
    _assume_routing(ctx)
    return _known_twin(indices, real)


def _assume_routing(ctx: Assumptions) -> None:
    ctx.routed = True
    ctx.note(f"assumed: routing decisions computed from the weights (topk / argmax of router scores) are "
             f"{_routing_words(ctx)}")


def _routing_words(ctx: Assumptions) -> str:
    if ctx.routing == SKEWED:
        return "skewed for the bound: every token routed to the last expert, every expert used"
    return "balanced: token i picks experts i*k .. i*k+k-1 (mod the number of experts)"


def _topk(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    values, indices = func(*args, **kwargs)
    if not known(args[0]) and args[0].is_floating_point():
        k = args[1] if len(args) > 1 else kwargs["k"]
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        indices = _routed(ctx, args[0], indices, dim, int(k))
    return values, indices


def _argmax(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is not None and not known(args[0]) and args[0].is_floating_point():
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if keep:
            return _routed(ctx, args[0], out, dim, 1)
        return _routed_squeezed(ctx, args[0], out, dim)
    return out


def _routed_squeezed(ctx: Assumptions, scores: torch.Tensor, indices: torch.Tensor, dim: int) -> torch.Tensor:
    """argmax without keepdim: one choice per row over ``scores.shape[dim]`` experts."""
    if not isinstance(indices, FakeTensor) or indices.numel() > KNOWN_NUMEL_LIMIT:
        return indices
    choices = scores.shape[dim]
    with no_dispatch():
        flat = _routing_indices(indices.numel(), choices, 1, ctx.routing).reshape(tuple(indices.shape))
        real = torch.empty_strided(tuple(indices.shape), tuple(indices.stride()), dtype=indices.dtype).copy_(flat)
    _assume_routing(ctx)
    return _known_twin(indices, real)


def _max_dim(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    values, indices = func(*args, **kwargs)
    if not known(args[0]) and args[0].is_floating_point():
        dim = args[1] if len(args) > 1 else kwargs["dim"]
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        indices = _routed(ctx, args[0], indices, dim, 1) if keep else _routed_squeezed(ctx, args[0], indices, dim)
    return values, indices


def _select_all(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    """``nonzero`` and friends: known inputs are computed exactly (by torch's constant propagation); on
    unknown ones every element counts as selected, the largest output the input allows."""
    try:
        return func(*args, **kwargs)
    except (DynamicOutputShapeException, DataDependentOutputException):
        pass
    ctx.note(f"assumed: {_op(func)} on values computed from the weights selects every element (an upper "
             "bound on its output)")
    fake_args = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, FakeTensor)]
    mode = fake_args[0].fake_mode
    stand_in = _distinct if "unique" in str(func) else _all_true
    with no_dispatch():
        real_args, real_kwargs = stand_in(args), stand_in(kwargs)
        real = func(*real_args, **real_kwargs)
    if isinstance(real, torch.Tensor):
        return _wrap(mode, real)
    return type(real)(_wrap(mode, r) if isinstance(r, torch.Tensor) else r for r in real)


def _wrap(mode: FakeTensorMode, real: torch.Tensor) -> torch.Tensor:
    if real.numel() <= KNOWN_NUMEL_LIMIT:
        return mode.fake_tensor_converter.from_real_tensor(mode, real, make_constant=True)
    with mode:
        return torch.empty_strided(tuple(real.shape), tuple(real.stride()), dtype=real.dtype, device="cpu")


def _all_true(tree: Any) -> Any:
    """Real stand-ins for fake arguments: their known values, else ones (every element selected, every
    index valid); other fakes keep their shape (zeros)."""
    if isinstance(tree, FakeTensor):
        if tree.constant is not None:
            return tree.constant
        if tree.dtype == torch.bool or not tree.is_floating_point():
            if tree.dtype == torch.bool:
                return torch.ones(tuple(tree.shape), dtype=torch.bool)
            return torch.zeros(tuple(tree.shape), dtype=tree.dtype)
        return torch.ones(tuple(tree.shape), dtype=tree.dtype)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_all_true(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _all_true(v) for k, v in tree.items()}
    return tree


def _distinct(tree: Any) -> Any:
    """Real stand-ins whose elements all differ (``unique`` keeps every one: the largest output)."""
    if isinstance(tree, FakeTensor):
        if tree.constant is not None:
            return tree.constant
        return torch.arange(tree.numel()).reshape(tuple(tree.shape)).to(tree.dtype)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_distinct(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _distinct(v) for k, v in tree.items()}
    return tree


def _index(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    """Boolean-mask indexing: exact with a known mask; with an unknown one every element is selected."""
    try:
        return func(*args, **kwargs)
    except (DynamicOutputShapeException, DataDependentOutputException):
        pass
    ctx.note("assumed: boolean-mask indexing with a mask computed from the weights selects every element "
             "(an upper bound)")
    src, indices = args[0], list(args[1])
    expanded: list[Any] = []
    for idx in indices:
        if isinstance(idx, torch.Tensor) and idx.dtype in (torch.bool, torch.uint8):
            known_mask = idx.constant if known(idx) else None
            with no_dispatch():
                mask = known_mask if known_mask is not None else torch.ones(tuple(idx.shape), dtype=torch.bool)
                parts = [p.clone() for p in mask.nonzero().unbind(1)]
            expanded.extend(_wrap(idx.fake_mode, p) for p in parts)
        else:
            expanded.append(idx)
    return func(src, expanded)


def _scalar(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    """``.item()`` / ``bool()`` / ``.tolist()``: known values are read; unknown ones are taken as True / 1."""
    try:
        return func(*args, **kwargs)
    except (DataDependentOutputException, DynamicOutputShapeException):
        pass
    ctx.note("assumed: .item() / bool() of a value computed from the weights is True (1): the branch taken "
             "when the condition holds")
    t = args[0]
    return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)


def _equal(ctx: Assumptions, func: Any, args: tuple, kwargs: dict) -> Any:
    """``torch.equal``: exact on known values (torch computes it on them); on unknown ones of the same
    shape, True."""
    try:
        return func(*args, **kwargs)
    except (DataDependentOutputException, DynamicOutputShapeException):
        pass
    if args[0].shape != args[1].shape:
        return False
    ctx.note("assumed: torch.equal on values computed from the weights is True")
    return True


def _op(func: Any) -> str:
    return str(func).replace(".default", "")


def _rules() -> dict[Any, Rule]:
    rules: dict[Any, Rule] = {}

    def add(name: str, rule: Rule) -> None:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            rules[op] = rule

    add("_grouped_mm.default", _grouped_mm)
    for name in RANDOM_MEANS:
        add(f"{name}.default", _random_mean)
    for name in _FACTORY_NAMES:
        add(name, _factory)
    add("topk.default", _topk)
    add("argmax.default", _argmax)
    add("max.dim", _max_dim)
    for name in ("nonzero.default", "masked_select.default", "argwhere.default", "_unique2.default",
                 "unique_dim.default", "unique_consecutive.default"):
        add(name, _select_all)
    add("index.Tensor", _index)
    add("_local_scalar_dense.default", _scalar)
    add("equal.default", _equal)
    return rules


RULES: dict[Any, Rule] = _rules()
"""Operator -> the rule that runs it instead of torch's fake kernel (see the module docstring)."""
