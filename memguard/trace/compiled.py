"""torch.compile: which parts of a model run compiled, and running them compiled on the fake twin.

Compiling changes what a training step allocates: AOTAutograd's partitioner decides which forward values
are saved for backward and which the backward recomputes, and inductor fuses pointwise chains so their
intermediates never exist, then plans and reuses the buffers of each graph. memguard does not model those
decisions; it lets torch make them. The fake twin's compiled parts are compiled with the real dynamo,
AOTAutograd and inductor (the same partitioner, lowering, fusion and memory planning as the user's run), and
the code inductor generates is run on fake tensors with every generated kernel replaced by a no-op: the
wrapper still allocates, reuses and frees its buffers in its own order, and memguard's recorder sees each of
those allocations as it sees an eager operator's. Graph breaks fall out of dynamo as in the real run: each
graph runs compiled, the code between them eagerly.

What this does not reproduce exactly, and how it errs:
- The fake twin lives on the CPU, so inductor generates code for its CPU backend. For a CUDA target the
  partition (saved vs recomputed) is the same decision; fusion and buffer reuse follow the CPU backend's
  choices, which fuse the same pointwise chains but may keep a different set of reduction buffers. CUDA
  graphs (``mode="reduce-overhead"``) and autotuning (``max-autotune``) are not modelled: their options are
  dropped and the estimate says so.
- Kernels' own scratch (a C++ kernel's stack or thread-local buffers) is outside torch's allocator in the
  real run too, so it is in neither number.
- Backends other than inductor: ``"eager"`` compiles nothing (the eager trace is exact); ``"aot_eager"`` is
  run as it is (it partitions with the default partitioner and runs the graphs eagerly); any other backend
  cannot be run on fake tensors safely, and the twin is traced eagerly with a note saying so.

Nothing here touches the user's model or their compiled code: the twin's compiled parts are new
``torch.compile`` calls with ``isolate_recompiles=True`` (their cache entries never serve the user's calls),
the inductor caches are off while memguard compiles, and the modules inductor loaded for memguard are
dropped from its in-memory cache afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memguard.errors import InvalidArgumentError, unknown_name

BACKENDS = ("inductor", "aot_eager", "eager")
"""The backends memguard runs on fake tensors; others are traced eagerly with a note."""

_LIGHTNING_STEPS = ("forward", "training_step", "validation_step", "test_step", "predict_step")
"""The methods Lightning's ``from_compiled`` wraps when a compiled LightningModule is handed to the Trainer."""

_DROPPED_OPTIONS = ("max_autotune", "max_autotune_pointwise", "max_autotune_gemm", "coordinate_descent_tuning",
                    "triton.cudagraphs", "epilogue_fusion_first", "freezing")
"""Inductor options that benchmark kernels or capture CUDA graphs: they need real data, so the analysis runs
without them (they change speed; only CUDA graphs change memory, stated in the estimate)."""


@dataclass(frozen=True)
class CompileSpec:
    """How a part of the model is compiled: the backend and what ``torch.compile`` was given."""

    backend: str = "inductor"
    options: dict[str, Any] = field(default_factory=dict)
    """Inductor's config patches (``mode=`` is folded into these by torch.compile)."""
    dynamic: bool | None = None
    fullgraph: bool = False

    @staticmethod
    def parse(value: Any, where: str = "compile") -> CompileSpec | None:
        """``compile=`` as a user writes it: True / False / None, a backend name, a mode name, or a mapping
        with ``backend``, ``mode``, ``fullgraph``, ``dynamic``, ``options``."""
        if value is None or value is False:
            return None
        if isinstance(value, CompileSpec):
            return value
        if value is True:
            return CompileSpec()
        if isinstance(value, str):
            if value in _MODES:
                return CompileSpec(options=_mode_options(value))
            return CompileSpec(backend=_backend_name(value, where))
        if isinstance(value, dict):
            unknown = set(value) - {"backend", "mode", "fullgraph", "dynamic", "options"}
            if unknown:
                raise InvalidArgumentError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: backend, mode, "
                                           "fullgraph, dynamic, options")
            mode = value.get("mode")
            if mode is not None and mode not in _MODES:
                raise InvalidArgumentError(f"{where}: mode must be one of {', '.join(_MODES)}, got {mode!r}")
            options = dict(_mode_options(mode) if mode else {})
            options.update(value.get("options") or {})
            backend = _backend_name(str(value.get("backend", "inductor")), f"{where}.backend")
            return CompileSpec(backend=backend, options=options,
                               dynamic=value.get("dynamic"), fullgraph=bool(value.get("fullgraph", False)))
        raise InvalidArgumentError(f"{where} must be true/false, a backend name or a mapping, got "
                                   f"{type(value).__name__}")

    def __hash__(self) -> int:
        return hash((self.backend, tuple(sorted(self.options.items())), self.dynamic, self.fullgraph))

    def describe(self) -> str:
        extras = [k for k in ("fullgraph",) if getattr(self, k)]
        if self.dynamic:
            extras.append("dynamic")
        return self.backend + (f", {', '.join(extras)}" if extras else "")


_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _backend_name(name: str, where: str) -> str:
    """A backend torch.compile knows by name (memguard runs :data:`BACKENDS`; others are predicted eager)."""
    from torch._dynamo import list_backends

    if name not in set(list_backends(exclude_tags=())) | set(BACKENDS):
        shown = set(list_backends()) | set(BACKENDS) | set(_MODES)  # without torch's debugging backends
        raise InvalidArgumentError(f"{where}: " + str(unknown_name("torch.compile backend or mode", name, shown)))
    return name


def _mode_options(mode: str) -> dict[str, Any]:
    if mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


@dataclass(frozen=True)
class CompiledPart:
    """One compiled region: ``path`` is the module's path in the model ("" for the whole model)."""

    path: str
    spec: CompileSpec
    lightning: bool = False
    """Compiled by Lightning's ``from_compiled`` (its step methods wrapped), rather than ``module.compile()``
    or an ``OptimizedModule``."""

    def describe(self) -> str:
        return self.path or "whole model"


# ---------------------------------------------------------------------------------------------------------
# Finding the compiled parts


def _spec_from_callback(callback: Any, fullgraph: bool = False, dynamic: bool | None = None) -> CompileSpec:
    """Walk dynamo's wrappers of a compile callback down to the backend it was given."""
    backend = callback
    name = None
    for _ in range(8):
        name = name or getattr(backend, "_compiler_name", None)
        inner = getattr(backend, "_torchdynamo_orig_backend", None)
        if inner is None or inner is backend:
            break
        backend = inner
    options: dict[str, Any] = {}
    if type(backend).__name__ == "_TorchCompileInductorWrapper":
        name = "inductor"
        options = dict(getattr(backend, "config", {}) or {})
        dynamic = getattr(backend, "dynamic", dynamic)
    elif name is None:
        name = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None) or type(backend).__name__
    return CompileSpec(backend=str(name), options=options, dynamic=dynamic, fullgraph=bool(fullgraph))


def _spec_of_function(fn: Callable) -> CompileSpec | None:
    """The spec of a function wrapped by ``torch.compile`` / a dynamo context (None if it is not one)."""
    if not getattr(fn, "_torchdynamo_orig_callable", None):
        return None
    try:
        nonlocals = inspect.getclosurevars(fn).nonlocals
    except (TypeError, ValueError):
        return CompileSpec(backend="unknown")
    callback = nonlocals.get("callback")
    if callback is None:
        return CompileSpec(backend="unknown")
    return _spec_from_callback(callback)


def _optimized_module_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


def _parts(model: nn.Module, strip: bool) -> tuple[nn.Module, list[CompiledPart]]:
    optimized = _optimized_module_type()
    parts: list[CompiledPart] = []

    def visit(module: nn.Module, path: str) -> nn.Module:
        while optimized is not None and isinstance(module, optimized):
            ctx = module.dynamo_ctx
            parts.append(CompiledPart(path, _spec_from_callback(ctx.callback, ctx.fullgraph, ctx._dynamic)))
            module = module._orig_mod
        impl = getattr(module, "_compiled_call_impl", None)
        if impl is not None:
            parts.append(CompiledPart(path, _spec_of_function(impl) or CompileSpec(backend="unknown")))
            if strip:
                module._compiled_call_impl = None
        ctx = getattr(module, "_compiler_ctx", None)
        if isinstance(ctx, dict) and ctx.get("compiler") == "dynamo":
            d = ctx.get("dynamo_ctx")
            spec = (_spec_from_callback(d.callback, d.fullgraph, d._dynamic) if d is not None
                    else CompileSpec(backend="unknown"))
            parts.append(CompiledPart(path, spec, lightning=True))
            if strip:
                for name in _LIGHTNING_STEPS:
                    module.__dict__.pop(name, None)
                module._compiler_ctx = None
        for name, child in list(module._modules.items()):
            if child is not None:
                replaced = visit(child, f"{path}.{name}" if path else name)
                if strip and replaced is not child:
                    module._modules[name] = replaced
        return module

    return visit(model, ""), parts


def find_compiled(model: nn.Module) -> list[CompiledPart]:
    """The compiled parts of the user's ``model``, read without changing it."""
    return _parts(model, strip=False)[1]


def uncompile(model: nn.Module) -> nn.Module:
    """Strip every torch.compile wrapper from ``model`` (memguard's twin, never the user's model), returning
    the plain module tree. Which parts were compiled is read from the user's model (:func:`find_compiled`):
    a deep copy already drops ``module.compile()``.

    A deep-copied wrapper would still call the user's own module: an ``OptimizedModule`` and Lightning's
    compiled step methods hold the original bound methods in closures that a deep copy does not rewrite."""
    return _parts(model, strip=True)[0]


def describe_parts(parts: list[CompiledPart]) -> str:
    """``compiled (inductor): whole model`` / ``compiled (inductor): layers.0, layers.1 (+2 more)``."""
    parts = analysable(parts)
    if not parts:
        return ""
    backends = sorted({p.spec.describe() for p in parts})
    names = [p.describe() for p in parts]
    shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return f"compiled ({'; '.join(backends)}): {shown}"


# ---------------------------------------------------------------------------------------------------------
# Compiling the twin's parts for the analysis


def analysable(parts: list[CompiledPart]) -> list[CompiledPart]:
    """The parts memguard runs compiled (backends it can run on fake tensors)."""
    return [p for p in parts if p.spec.backend in BACKENDS]


def compile_notes(parts: list[CompiledPart]) -> list[str]:
    """What an estimate must say about how its compiled parts were analysed: backends run as eager, options
    left out."""
    notes = []
    others = sorted({p.spec.backend for p in parts} - set(BACKENDS))
    if others:
        notes.append(f"torch.compile backend {', '.join(others)} cannot run on fake tensors: those parts are "
                     "predicted as eager execution")
    dropped = sorted({k for p in analysable(parts) for k, v in p.spec.options.items() if k in _DROPPED_OPTIONS and v})
    if dropped:
        notes.append(f"torch.compile options not modelled (they need real kernels): {', '.join(dropped)}"
                     + ("; CUDA graphs keep their own memory pool, not included" if "triton.cudagraphs" in dropped
                        else ""))
    return notes


def _backend(spec: CompileSpec) -> Any:
    if spec.backend != "inductor":
        return spec.backend
    options = {k: v for k, v in spec.options.items() if k not in _DROPPED_OPTIONS}

    def inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=options)

    return inductor


def _compiled(fn: Callable, spec: CompileSpec) -> Callable:
    return torch.compile(fn, backend=_backend(spec), fullgraph=spec.fullgraph, dynamic=spec.dynamic,
                         isolate_recompiles=True)


def compile_twin(twin: nn.Module, parts: list[CompiledPart],
                 around: Callable[[str, Callable], Callable] | None = None,
                 hooks: Callable[[nn.Module, str], None] | None = None) -> nn.Module:
    """Compile the twin's ``parts`` (paths in the plain tree) as the user's run compiles them, and return the
    twin to run (the compiled wrapper itself when the whole model is compiled). ``hooks`` puts the
    recorder's module attribution on each compiled wrapper and ``around`` on each compiled step method: both
    stay outside the compiled code."""
    root = twin
    modules = dict(twin.named_modules())
    for part in analysable(parts):
        module = modules[part.path]
        if part.lightning:
            for name in _LIGHTNING_STEPS:
                bound = getattr(module, name, None)
                if bound is not None:
                    call = _compiled(bound, part.spec)
                    setattr(module, name, around(part.path, call) if around is not None else call)
            continue
        wrapper = _compiled(module, part.spec)
        if hooks is not None:
            hooks(wrapper, part.path)
        if not part.path:
            root = wrapper
            continue
        parent_path, _, name = part.path.rpartition(".")
        modules[parent_path]._modules[name] = wrapper
    return root


# ---------------------------------------------------------------------------------------------------------
# Running inductor's code on fake tensors


def _no_kernel(*_args: Any, **_kwargs: Any) -> None:
    """A generated kernel: it writes into buffers the wrapper already allocated, so it allocates nothing."""


def _stub_kernel(_self: Any, *_args: Any, **_kwargs: Any) -> Callable:
    return _no_kernel


def _empty_strided(size: Any, stride: Any, dtype: torch.dtype) -> torch.Tensor:
    """inductor's buffer allocation, through the dispatcher so the fake mode and the recorder see it."""
    return torch.empty_strided(size, stride, dtype=dtype, device="cpu")


def _reinterpret(tensor: torch.Tensor, size: Any, stride: Any, offset: int = 0) -> torch.Tensor:
    return torch.as_strided(tensor, size, stride, offset)


@contextlib.contextmanager
def inductor_on_fakes() -> Iterator[None]:
    """While active, inductor compiles without building kernels and its generated code allocates through
    the dispatcher (a fake tensor per buffer). Caches are off so that nothing compiled here is reused by a
    real run, and the wrapper modules loaded here are forgotten afterwards.

    Kernels are generated scalar (``cpp.simdlen=1``): their code is thrown away, and vectorizing it costs
    about a sixth of the analysis. Vectorization works inside a kernel (registers, loop tails); which
    buffers exist, and when they are allocated and freed, is decided before it (fusion, the wrapper's
    memory planning): benchmarks/results/compiled.md is unchanged to the byte."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.codecache import PyCodeCache

    guards = torch._C._dynamo.guards
    saved = (AsyncCompile.cpp_pybinding, AsyncCompile.cpp, guards._empty_strided_cpu, guards._reinterpret_tensor)
    modules_before = set(PyCodeCache.modules_no_attr)
    count_before = len(PyCodeCache.modules)
    AsyncCompile.cpp_pybinding = _stub_kernel
    AsyncCompile.cpp = _stub_kernel
    guards._empty_strided_cpu = _empty_strided
    guards._reinterpret_tensor = _reinterpret
    try:
        with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False, autotune_local_cache=False,
                                   compile_threads=1, **{"cpp.simdlen": 1}), \
                functorch_config.patch(enable_autograd_cache=False):
            yield
    finally:
        (AsyncCompile.cpp_pybinding, AsyncCompile.cpp, guards._empty_strided_cpu,
         guards._reinterpret_tensor) = saved
        for key in set(PyCodeCache.modules_no_attr) - modules_before:
            PyCodeCache.modules_no_attr.pop(key, None)
        del PyCodeCache.modules[count_before:]


def teach_rng_operators(mode_type: type) -> None:
    """Let a dispatch mode run the RNG wrappers compiled code calls around a checkpointed region's random
    ops (higher-order operators have no fallback for a mode). Each does what its CPU kernel does: save the
    generator's state (a tensor kept for the recomputation) and run the op, or run it under a saved state."""
    from torch._prims.rng_prims import run_and_save_rng_state, run_with_rng_state

    def run_and_save(mode: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        with mode:
            return torch.get_rng_state(), op(*args, **kwargs)

    def run_with(mode: Any, _state: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        with mode:
            current = torch.get_rng_state()  # held while the op runs, as the CPU kernel holds it
            out = op(*args, **kwargs)
            del current
            return out

    run_and_save_rng_state.py_impl(mode_type)(run_and_save)
    run_with_rng_state.py_impl(mode_type)(run_with)

