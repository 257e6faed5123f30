"""Make libraries take the branches of an eager run while memguard traces on fake tensors.

Some libraries ask whether a tensor is a FakeTensor to detect that a compiler is tracing them, and then
take a branch that is safe for a graph but not the one an eager run takes. transformers does this in
``is_tracing(tensor)``: on a fake ``position_ids`` it keeps the packed-sequence mask that an eager run
drops after reading the values, so it builds a full boolean attention mask that the eager run never makes
(and checkpointed layers keep it alive until backward: +2.6% for a tiny Qwen3). memguard's fake tensors
stand for a real eager run, so while it traces they are not "tracing" in that sense: data-dependent reads
are answered by :mod:`memguard.trace.fake_rules` (exactly for values it knows, else by a stated assumption).

torch itself does the same in ``Module._apply`` (``module.to(dtype)``, ``.float()``...): fake parameters are
swapped for new ones with ``torch.utils.swap_tensors`` where real ones get ``param.data = converted``. A swap
needs the parameter to have no other reference, which fails for any module converted inside its forward
(SwitchTransformers' router converts its classifier on every call) because autograd, the optimizer and
memguard's recorder all hold the parameter. :func:`eager_module_conversion` gives fake parameters the eager
conversion: the parameter keeps its identity and takes the new storage, a copy only where the dtype changes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor


def _not_fake(_tensor: Any) -> bool:
    return False


@contextlib.contextmanager
def eager_branches() -> Iterator[None]:
    """While active, transformers' tracing check no longer counts fake tensors as a sign of tracing.

    Only a transformers that is already imported is touched: the model being traced imported it."""
    utils = sys.modules.get("transformers.utils.import_utils")
    original = getattr(utils, "is_fake_tensor", None)
    if original is None:
        yield
        return
    utils.is_fake_tensor = _not_fake
    try:
        yield
    finally:
        utils.is_fake_tensor = original


def _is_plain_fake(t: Any) -> bool:
    """A fake tensor or fake parameter (whose type is FakeTensor too), not a wrapper subclass around one."""
    return type(t) is FakeTensor


@contextlib.contextmanager
def eager_module_conversion() -> Iterator[None]:
    """While active, ``torch.utils.swap_tensors`` of two fake tensors sets ``.data`` instead (what
    ``Module._apply`` does to real parameters), unless the user asked torch to swap module parameters."""
    original = torch.utils.swap_tensors

    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        if (torch.__future__.get_swap_module_params_on_conversion()
                or not (_is_plain_fake(t1) and _is_plain_fake(t2))):
            original(t1, t2)
            return
        with torch.no_grad():
            t1.data = t2.detach()

    torch.utils.swap_tensors = swap_tensors
    try:
        yield
    finally:
        torch.utils.swap_tensors = original
