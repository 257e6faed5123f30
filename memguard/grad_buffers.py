"""Autograd's in-place gradient accumulation, which fake tensors never get.

When two gradients flow into the same input of a backward node (a tensor read twice: a loop over time
steps, slices of one projection, a residual), the autograd engine's input buffer adds them. For a plain
tensor it adds in place into whichever operand it holds the only reference to (``can_accumulate_inplace``
in torch/csrc/autograd/input_buffer.cpp); for a tensor subclass, and every fake tensor is one, it always
allocates ``old + new``. A trace that kept the fake behaviour would hold one extra gradient-sized buffer at
each accumulation: +7% on a model that reads ``h[:, :, t]`` in a loop over time, +20% on one that slices
one projection into many attention blocks.

Recognising an accumulation: it is the ``add.Tensor`` the engine runs after a node's backward has returned
(its post-hook has fired) while that node is still the current one. "Only reference" is read from the
reference counts torch exposes and compared with the counts of an operand known to be sole, measured once
in the same dispatch stack (:meth:`GradBuffers.calibrate`). Anything above that count (a gradient that also
waits in another buffer, a view that shares the storage) keeps the out-of-place allocation, so this can
only remove memory the real run never allocates; where the counts cannot be read it changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

_ADD = torch.ops.aten.add.Tensor


def _counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(references to the tensor, references to its storage) as seen from inside a dispatch."""
    try:
        return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _dense(t: torch.Tensor) -> bool:
    return bool(torch._prims_common.is_non_overlapping_and_dense_or_false(t))


class GradBuffers:
    """Watches one backward pass and names the operand the real engine would accumulate into."""

    def __init__(self) -> None:
        self._window: Any = None  # the node whose outputs are being added into their buffers
        self._sole: tuple[int, int] | None = None  # counts of an operand the engine holds alone
        self._probing = False
        self._probed: list[tuple[int, int] | None] = []

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
        self._window = None

    # the decision ---------------------------------------------------------------------------------------
    def in_place_target(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The operand of an engine accumulation that the real run adds into, or None for any other op."""
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
        if self._sole is None:
            return None
        for operand in (old, new):  # the engine's order
            if _dense(operand) and _counts(operand) == self._sole:
                return operand
        return None

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
