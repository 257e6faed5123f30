"""Trace training steps on fake tensors and record every allocation and free.

Why this works: PyTorch's fake tensors run every operator's shape logic without computing or allocating,
so a whole forward / backward / optimizer step runs in seconds for a 70B model on a laptop. A dispatch mode
on top of the fake mode sees each operator's outputs; a new storage among them is an allocation, and a weak
reference on the storage tells us the moment the real allocator would have freed it (storage lifetime is
refcounted, so fake and real runs free at the same points of the program).

The result, :class:`Trace`, is device-neutral raw bytes in program order. Device models
(:mod:`memguard.device`) turn it into what a given device would report (rounding, allocator segments,
workspaces).

The package: recording.py (Trace, the recorder and its dispatch mode), twin.py (the fake twin), steps.py (the
step loop and :func:`trace_training`), compiled.py (torch.compile'd parts run through torch's own compiler), and the places the trace departs from plain fake tensors:
fake_rules.py (values and kernels), library_branches.py (libraries that branch on fake tensors) and
autograd_in_place.py (what autograd does in place only for plain tensors).
"""

from memguard.trace.recording import ROOT, SAVED, UNTRACED, Trace
from memguard.trace.steps import TRACED_MICRO_BATCHES, StepProgram, TraceCache, default_loss_fn, trace_training
from memguard.trace.twin import fake_batch, fake_model_copy

__all__ = ["ROOT", "SAVED", "TRACED_MICRO_BATCHES", "UNTRACED", "StepProgram", "Trace", "TraceCache",
           "default_loss_fn", "fake_batch", "fake_model_copy", "trace_training"]
