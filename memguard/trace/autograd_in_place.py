"""What autograd does in place for plain tensors and never for fake ones.

Fake tensors are a tensor subclass, and autograd's C++ code takes an out-of-place branch for subclasses in
two places where it works in place for the plain tensors of a real run. A trace that kept the fake
behaviour would hold one extra gradient-sized buffer at each, and over-predict:

- Accumulation. When two gradients flow into one input of a backward node (a tensor read twice: a loop
  over time steps, slices of one projection), the engine's input buffer adds them in place into whichever
  operand it holds the only reference to (``can_accumulate_inplace`` in torch/csrc/autograd/input_buffer.cpp);
  for a subclass it allocates ``old + new``. +7% on a model that reads ``h[:, :, t]`` in a loop, +20% on one
  that slices a projection into many attention blocks.
- Scatter-type backward formulas. ``gather``, ``index_select`` and ``take`` backward make a zero tensor and
  scatter the gradient into it in place (``scatter_add_``, ``index_add_``, ``put_``); "for composite
  compliance" they call the out-of-place twin when an operand is a subclass (FunctionsManual.cpp). +12% on a
  model whose relative-position logits are gathered.

Recognising them: an accumulation is the ``add.Tensor`` the engine runs after a node's backward returned
(its post-hook has fired) while that node is still the current one; a formula's scatter is an out-of-place
scatter whose base is the zeros the same C++ node just made. "Only reference" is read from the reference
counts torch exposes and compared with the counts of an operand known to be sole, measured once in the same
dispatch stack (:meth:`AutogradInPlace.calibrate`). Anything above that count (a gradient that also waits in
another buffer, a view that shares the storage) keeps the out-of-place allocation, so this can only remove
memory the real run never allocates; where the counts cannot be read it changes nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_ADD = torch.ops.aten.add.Tensor
_aten = torch.ops.aten
# Operators a backward formula builds its zero base with, and the out-of-place scatters it then calls on
# that base only for subclasses (their plain-tensor branch is the in-place twin).
_ZERO_MAKERS = {_aten.new_zeros.default, _aten.zeros_like.default, _aten.zeros.default}
_SCATTERS = {
    _aten.scatter_add.default, _aten.index_add.default, _aten.put.default, _aten.index_put.default,
    _aten.scatter.src, _aten.scatter.value, _aten.masked_scatter.default,
}


def _counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(references to the tensor, references to its storage) as seen from inside a dispatch."""
    try:
        return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _dense(t: torch.Tensor) -> bool:
    return bool(torch._prims_common.is_non_overlapping_and_dense_or_false(t))


class AutogradInPlace:
    """Watches one backward pass and names the operand the real run would update in place."""

    def __init__(self) -> None:
        self._window: Any = None  # the node whose outputs are being added into their buffers
        self._sole: tuple[int, int] | None = None  # counts of an operand the engine holds alone
        self._probing = False
        self._probed: list[tuple[int, int] | None] = []
        self._zeros: Any = None  # (weak reference to the zeros a C++ node just made, that node)

    # the window between a node's backward and the next node -------------------------------------------
    def _opened(self, _grad_inputs: Any, _grad_outputs: Any) -> None:
        # Holds no node itself (a hook that did would keep every node alive through a cycle).
        self._window = torch._C._current_autograd_node()

    def watch(self, loss: torch.Tensor) -> None:
        """Hook every backward node reachable from ``loss``. AccumulateGrad is left alone: a hook there
        would add a reference to the incoming gradient and change whether the engine steals it."""
        seen: set[int] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if type(node).__name__ != "AccumulateGrad":
                node.register_hook(self._opened)
            stack.extend(child for child, _ in node.next_functions)

    def close(self) -> None:
        self._window = self._zeros = None

    def made(self, func: Any, out: Any) -> None:
        """Remember the zeros a C++ backward node makes: the base its formula may scatter into."""
        if func in _ZERO_MAKERS and isinstance(out, torch.Tensor):
            node = torch._C._current_autograd_node()
            if node is not None and not isinstance(node, torch.autograd.function.BackwardCFunction):
                self._zeros = (weakref.ref(out), node)

    # the decision ---------------------------------------------------------------------------------------
    def in_place_target(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The operand of an engine accumulation that the real run adds into, or None for any other op."""
        if func in _SCATTERS:
            return self._scatter_base(args)
        if func is not _ADD or self._window is None or kwargs or len(args) != 2 or torch.is_grad_enabled():
            return None
        if torch._C._current_autograd_node() is not self._window:
            return None
        old, new = args
        if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)) or old is new:
            return None
        if old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
            return None
        if self._probing:
            self._probed.append(_counts(old))
            return None
        return next((operand for operand in (old, new) if self._held_alone(operand)), None)  # the engine's order

    def _scatter_base(self, args: tuple) -> torch.Tensor | None:
        if self._zeros is None or torch.is_grad_enabled() or not args:
            return None
        ref, node = self._zeros
        base = args[0]
        if ref() is not base or torch._C._current_autograd_node() is not node:
            return None
        return base if self._held_alone(base) else None

    def _held_alone(self, t: torch.Tensor) -> bool:
        """The real run's test for working in place on ``t``: dense, and no reference but the one owner's
        (counts equal to the calibrated sole operand's). Never true before calibration succeeded."""
        return self._sole is not None and _dense(t) and _counts(t) == self._sole

    def calibrate(self) -> None:
        """Measure the counts of an operand the engine holds alone, through the dispatch stack now active:
        ``h`` is read twice, its two gradients meet in one buffer and neither is referenced elsewhere.
        Call with recording paused; if the probe sees anything unexpected the mechanism stays off."""
        if self._sole is not None:
            return
        self._probing, self._probed = True, []
        try:
            with torch.enable_grad():
                leaf = torch.empty(4, 4, requires_grad=True)
                h = leaf * 2
                loss = h.sin().sum() + h.cos().sum()
                self.watch(loss)
                loss.backward()
        except Exception:  # noqa: BLE001 - a failed probe only leaves the mechanism off
            self._probed = []
        finally:
            self._probing = False
            self.close()
        if len(self._probed) == 1 and self._probed[0] is not None:
            self._sole = self._probed[0]
