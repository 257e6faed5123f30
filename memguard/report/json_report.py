"""``memguard check --json``: the check as data, sizes in bytes, the same facts as the text report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from memguard.text import HOLDER_ROWS, KIND_ROWS

if TYPE_CHECKING:  # importing them here would load torch for `memguard gpus`
    from memguard.results import CheckResult, Estimate, TargetResult


def _holders_json(est: Estimate) -> dict[str, Any]:
    """The holders at the peak as data (bytes): every holder, and the report's two roll-ups."""
    return {
        "by_module": [g.to_dict() for g in est.top_holders(HOLDER_ROWS, by="module")],
        "by_kind": [g.to_dict() for g in est.top_holders(KIND_ROWS, by="kind")],
        "all": [h.to_dict() for h in est.holders],
    }

# ---------------------------------------------------------------------------------------------------------
# JSON


def to_json(result: CheckResult) -> dict[str, Any]:
    """The check as JSON-ready data; sizes stay in bytes.

    The top-level ``fits`` / ``capacity_bytes`` / ``gpu`` / ``as_configured`` / ``plan`` describe the GPU
    that decides the exit code (the first with the worst outcome; the only one when one GPU is checked);
    ``targets`` holds the same for every GPU, in order.
    """
    spec = result.spec
    deciding = result.deciding
    targets = [_target_json(t, spec.margin) for t in result.targets]
    top = targets[result.targets.index(deciding)]
    return {
        "fits": result.fits,
        "exit_code": result.exit_code,
        "margin": spec.margin,
        "capacity_bytes": top["capacity_bytes"],
        "gpu": top["gpu"],
        "as_configured": top["as_configured"],
        "plan": top["plan"],
        "notes": list(dict.fromkeys([*result.notes, *top["notes"]])),
        "config": {
            "path": spec.path,
            "kind": spec.kind,
            "model": spec.model_label,
            "parameters": result.parameters,
            "trainable_parameters": result.trainable,
            "batch": _batch_json(spec.batch),
            "training": spec.training.to_dict(),
            "quantization": spec.quantization,
            "lora": None if spec.lora is None else {
                "r": spec.lora.r, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                "target_modules": list(spec.lora.target_modules) if isinstance(spec.lora.target_modules, tuple)
                else spec.lora.target_modules},
            "devices": spec.devices,
            "num_nodes": spec.num_nodes,
            "world_size": spec.world_size,
            "strategy": spec.strategy,
            "tensor_parallel_size": spec.tensor_parallel_size,
            "data_parallel_size": spec.data_parallel_size,
            "allow": None if spec.allow is None else list(spec.allow),
            "fallback": spec.fallback,
        },
        "targets": targets,
        **({k: v for k, v in top.items() if k.startswith(("max_", "min_"))} if len(targets) == 1 else {}),
    }


def _target_json(t: TargetResult, margin: float) -> dict[str, Any]:
    g = t.target
    return {
        "gpu": {"name": g.name, "source": g.source, "catalog": g.catalog.name if g.catalog is not None else None,
                "index": g.index, "bf16": g.bf16, "capacity_bytes": g.capacity_bytes},
        "capacity_bytes": g.capacity_bytes,
        "fits": t.fits,
        "exit_code": t.exit_code,
        "as_configured": _estimate_json(t.estimate, g.capacity_bytes, margin),
        "plan": None if t.plan is None else {
            "fits": t.plan.fits,
            "cost": t.plan.cost,
            "changes": [{"knob": c.knob, "before": c.before, "after": c.after, "how": c.how, "cost": c.cost,
                         "why": c.why} for c in t.plan.changes],
            "config": t.plan.config.to_dict(),
            "tried": len(t.plan.tried),
            **_estimate_json(t.plan.estimate, g.capacity_bytes, margin),
        },
        "notes": list(dict.fromkeys([*t.notes, *t.estimate.notes])),
        **_sizing_json(t),
    }


def _sizing_json(t: TargetResult) -> dict[str, Any]:
    """``"max_batch_size": N`` (as configured), ``"max_batch_size_with_plan"`` (after each change of the
    plan) and ``"max_batch_size_search"`` (the estimates behind it), per question asked."""
    out: dict[str, Any] = {}
    for answer in t.sizing:
        name = f"max_{answer.knob}"
        out[name] = answer.configured.value
        out[f"{name}_with_plan"] = [{"changes": label, name: r.value} for label, r in answer.with_changes]
        out[f"{name}_search"] = answer.configured.to_dict()
    if t.min_gpus is not None:
        out["min_gpus"] = t.min_gpus.to_dict()
    return out


def _estimate_json(est: Estimate, capacity: int, margin: float) -> dict[str, Any]:
    from memguard.plan import required_bytes

    need = required_bytes(est, margin)
    return {
        "peak_bytes": est.peak_bytes,
        "reserved_bytes": est.reserved_bytes,
        "device_bytes": est.device_bytes,
        "required_bytes": need,
        "headroom_bytes": capacity - need,
        "breakdown": {str(k): v for k, v in est.breakdown.items()},
        "peak_phase": est.peak_phase,
        "phase_peaks": dict(est.phase_peaks),
        "precision": est.precision,
        "optimizer": est.optimizer,
        "approximate": est.approximate,
        "step_order": est.step_order,
        "compiled": est.compiled,
        "timeline": [{"index": p.index, "phase": p.phase, "allocated_bytes": p.allocated_bytes} for p in est.timeline],
        "holders": _holders_json(est),
    }


def _batch_json(batch: Any) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return {"shape": list(batch.shape), "dtype": str(batch.dtype).removeprefix("torch.")}
    if isinstance(batch, Mapping):
        return {str(k): _batch_json(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_batch_json(v) for v in batch]
    return None
