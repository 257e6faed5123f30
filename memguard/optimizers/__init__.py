"""Optimizers: what each one memguard knows keeps and allocates, how the trace builds it, and how a live run
swaps it.

Why a table of *layouts and programs* rather than of bytes per parameter: what an optimizer keeps depends
on each parameter's size (bitsandbytes keeps tensors under 4096 elements in 32 bits, torchao only quantizes
tensors whose size divides its block, Adafactor factors matrices), and its step scratch depends on the
implementation and on the order of the parameters. Torch optimizers are traced for real on meta tensors
(for-loop and foreach), so the trace is exact; their programs serve the analytic what-ifs and are checked
against the trace in the tests. Optimizers that cannot run on shape-only tensors (bitsandbytes, torchao,
Lion, torch's fused kernels) are traced through a :class:`ShapeOnlyOptimizer` that executes the row's
layout and program, so the analytic functions and the trace agree by construction for those.

The modules, each importing only those above it:

- :mod:`~memguard.optimizers.programs`: parameter, state-tensor and step-program types, and torch.optim's
  layouts and programs;
- :mod:`~memguard.optimizers.library_programs`: bitsandbytes', torchao's and Lion's;
- :mod:`~memguard.optimizers.catalog`: the catalog rows, class-to-row mapping and analytic what-ifs;
- :mod:`~memguard.optimizers.shape_only`: the shape-only stand-ins the trace runs;
- :mod:`~memguard.optimizers.factories`: ``make_factory`` and ``first_optimizer``;
- :mod:`~memguard.optimizers.swapping`: rebuilding a live optimizer as another class.

Every public name is re-exported here, so ``from memguard.optimizers import X`` works for all of them.
"""

from memguard.optimizers.catalog import (
    CATALOG,
    NOMINAL_SHAPE,
    OptimizerEntry,
    ParamsLike,
    catalog_name,
    entry,
    entry_for_class,
    names,
    param_specs,
    state_breakdown,
    state_bytes,
    step_transient_bytes,
    unified_state_bytes,
)
from memguard.optimizers.factories import first_optimizer, make_factory
from memguard.optimizers.library_programs import BNB_BLOCKSIZE, BNB_QMAP_SIZE, PAGED_MIN_NUMEL
from memguard.optimizers.programs import (
    IMPLEMENTATIONS,
    LOCATIONS,
    Alloc,
    Buffer,
    Event,
    Free,
    Layout,
    MakeState,
    Options,
    ParamSpec,
    Program,
    program_peak,
)
from memguard.optimizers.shape_only import Factory, ShapeOnlyOptimizer, adam_like_bound, stand_in
from memguard.optimizers.swapping import (
    SHARED_MEANING,
    SwapPlan,
    available,
    real_class,
    rebuild_optimizer,
    repoint_scheduler,
    swap_plan,
)

__all__ = [
    "BNB_BLOCKSIZE",
    "BNB_QMAP_SIZE",
    "CATALOG",
    "IMPLEMENTATIONS",
    "LOCATIONS",
    "NOMINAL_SHAPE",
    "PAGED_MIN_NUMEL",
    "SHARED_MEANING",
    "Alloc",
    "Buffer",
    "Event",
    "Factory",
    "Free",
    "Layout",
    "MakeState",
    "OptimizerEntry",
    "Options",
    "ParamSpec",
    "ParamsLike",
    "Program",
    "ShapeOnlyOptimizer",
    "SwapPlan",
    "adam_like_bound",
    "available",
    "catalog_name",
    "entry",
    "entry_for_class",
    "first_optimizer",
    "make_factory",
    "names",
    "param_specs",
    "program_peak",
    "real_class",
    "rebuild_optimizer",
    "repoint_scheduler",
    "stand_in",
    "state_breakdown",
    "state_bytes",
    "step_transient_bytes",
    "swap_plan",
    "unified_state_bytes",
]
