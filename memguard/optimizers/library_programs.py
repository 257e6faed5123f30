"""Layouts and step programs of the optimizers outside torch.optim: bitsandbytes (8-bit and paged
AdamW / Adam), torchao (blockwise 8-bit, 4-bit and fp8 AdamW) and lion-pytorch's Lion.

These optimizers cannot run on shape-only tensors, so the trace runs a
:class:`~memguard.optimizers.shape_only.ShapeOnlyOptimizer` that executes exactly these descriptions: what
they say is what the estimate counts. They are kept apart from torch's (:mod:`memguard.optimizers.programs`)
because each is written from another library's source, cited in its section, and changes when that
library does.
"""

from __future__ import annotations

import torch

from memguard.optimizers.programs import (
    Alloc,
    Buffer,
    Event,
    Free,
    Layout,
    MakeState,
    Options,
    ParamSpec,
    Program,
    _alloc_each,
    _free,
    _state_first,
)


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes (bitsandbytes/optim/optimizer.py: Optimizer2State.init_state / update_step)

PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages a state buffer only when its parameter has at least this many elements
(``Optimizer8bit.get_state_buffer``: ``p.numel() < 1e5`` stays in ordinary device memory)."""

BNB_BLOCKSIZE = 256
"""Block size of bitsandbytes' blockwise 8-bit optimizer states (hard-coded in ``init_state``)."""
BNB_QMAP_SIZE = 256
"""Entries of bitsandbytes' dynamic quantization maps (``create_dynamic_map``): float32, one signed map
for the first moment and one unsigned map for the second, shared by every parameter."""


def _bnb_bits(o: Options, eight_bit: bool) -> int:
    return 8 if eight_bit else int(o.get("optim_bits", 32))


def _bnb_layout(eight_bit: bool, paged: bool) -> Layout:
    def layout(p: ParamSpec, o: Options) -> list[Buffer]:
        """Two moments: uint8 with float32 absmax per block of 256 and the two shared quantization maps,
        or float32 (whatever the parameter's dtype) below ``min_8bit_size`` elements or with 32-bit
        state. The step counter is a Python int. Paged buffers of parameters with at least
        ``PAGED_MIN_NUMEL`` elements live in unified memory on CUDA (on the CPU, paging falls back to
        ordinary memory); absmax and maps never are paged."""
        bits = _bnb_bits(o, eight_bit)
        if p.numel < int(o.get("min_8bit_size", 4096)):
            bits = 32
        is_paged = paged or bool(o.get("is_paged", False))
        where = "unified" if is_paged and not o.on_cpu and p.numel >= PAGED_MIN_NUMEL else "device"
        if bits == 32:
            out = [Buffer("state1", p.shape, torch.float32, where), Buffer("state2", p.shape, torch.float32, where)]
        else:
            blocks = -(-p.numel // BNB_BLOCKSIZE)
            out = [
                Buffer("state1", p.shape, torch.uint8, where),
                Buffer("qmap1", (BNB_QMAP_SIZE,), torch.float32, shared=True),
                Buffer("state2", p.shape, torch.uint8, where),
                Buffer("qmap2", (BNB_QMAP_SIZE,), torch.float32, shared=True),
                Buffer("absmax1", (blocks,), torch.float32),
                Buffer("absmax2", (blocks,), torch.float32),
            ]
        if o.get("max_unorm", 0.0) > 0:
            out.append(Buffer("unorm_vec", (1,), torch.float32))
        return out

    return layout


def _scalar_op(out: Alloc) -> list[Event]:
    # An eager op between a tensor and a Python float wraps the float into two small CPU tensors (a
    # float64 and a float32 copy) that live while the op's output is allocated.
    return [Alloc("wrapped64", 8), Alloc("wrapped32", 4), out, Free("wrapped32"), Free("wrapped64")]


def _bnb_program(eight_bit: bool) -> Program:
    def program(ps: list[ParamSpec], o: Options) -> list[Event]:
        """State is created parameter by parameter, just before its update. On CUDA the update is one
        in-place kernel (``optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``): no scratch.
        On the CPU (backends/cpu/ops.py) the update runs in eager fp32: 8-bit state is dequantized into
        two fp32 copies, the gradient (and a half-precision parameter) converted to fp32, the denominator
        computed with one temporary, then both moments re-quantized through a uint8 + absmax pair; 32-bit
        state computes ``state1 / (state2.sqrt() + eps)`` with two temporaries. Checked against the CPU
        backend's measured allocations, byte for byte."""
        ev: list[Event] = []
        for i, p in enumerate(ps):
            ev.append(MakeState(i))
            if not o.on_cpu:
                continue
            f32 = 4 * p.numel
            half = p.dtype != torch.float32
            eight = _bnb_bits(o, eight_bit) == 8 and p.numel >= int(o.get("min_8bit_size", 4096))
            keys: list[str] = []
            if eight:
                ev += [Alloc("s1f", f32), Alloc("s2f", f32)]
                keys += ["s1f", "s2f"]
            if half:
                ev += [Alloc("g_cast", f32), *_scalar_op(Alloc("g", f32)), Free("g_cast"), Alloc("p_f32", f32)]
                keys += ["g", "p_f32"]
            else:
                ev += _scalar_op(Alloc("g", f32))
                keys.append("g")
            if eight:
                ev += [Alloc("sqrt", f32), *_scalar_op(Alloc("denom", f32)), Free("sqrt")]
                keys.append("denom")
                blocks = -(-p.numel // BNB_BLOCKSIZE)
                for s in ("1", "2"):
                    ev += [Alloc(f"absmax{s}", 4 * blocks), Alloc(f"codes{s}", p.numel), Free(f"absmax{s}"),
                           Free(f"codes{s}")]
            else:
                ev += [Alloc("sqrt", f32), *_scalar_op(Alloc("sum", f32)), Free("sqrt"),
                       Alloc("update", f32), Free("sum")]
                keys.append("update")
            _free(ev, keys)
        return ev

    return program


# ---------------------------------------------------------------------------------------------------------
# torchao (torchao/optim/adam.py: _AdamBase._new_buffer, subclass_8bit / subclass_4bit / subclass_fp8)

_AO_KINDS = {
    # kind: (default block size, codes bytes per element numerator/denominator, qmap entries)
    "8bit": (256, torch.uint8, 1, 256),
    "4bit": (128, torch.uint8, 2, 16),
    "fp8": (256, torch.float8_e4m3fn, 1, 0),
}


def _ao_keys(o: Options) -> list[str]:
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if o.get("amsgrad", False) else [])


def _ao_quantized(p: ParamSpec, block: int) -> bool:
    # _new_buffer: "follow bitsandbytes, only quantize tensors >= 4096 values" that split into whole blocks.
    return p.numel >= 4096 and p.numel % block == 0


def _ao_layout(kind: str) -> Layout:
    default_block, codes_dtype, per_byte, qmap = _AO_KINDS[kind]

    def layout(p: ParamSpec, o: Options) -> list[Buffer]:
        """A host float32 step counter, then per moment either the quantized subclass (codes in the
        parameter's shape, or packed two per byte for 4-bit; float32 scales per block; a float32 qmap of
        its own per tensor for 8-bit and 4-bit) or, when the parameter is small or does not split into
        whole blocks, a plain tensor in the parameter's dtype."""
        block = int(o.get("block_size", default_block))
        out = [Buffer("step", (), torch.get_default_dtype(), "host")]
        for key in _ao_keys(o):
            if not _ao_quantized(p, block):
                out.append(Buffer(key, p.shape, p.dtype))
                continue
            codes_shape = p.shape if per_byte == 1 else (p.numel // per_byte,)
            out.append(Buffer(f"{key}.codes", codes_shape, codes_dtype))
            out.append(Buffer(f"{key}.scale", (p.numel // block,), torch.float32))
            if qmap:
                out.append(Buffer(f"{key}.qmap", (qmap,), torch.float32))
        return out

    return layout


def _ao_program(kind: str) -> Program:
    default_block = _AO_KINDS[kind][0]

    def program(ps: list[ParamSpec], o: Options) -> list[Event]:
        """State is created parameter by parameter; each update is one ``torch.compile``d
        ``single_param_adam``. Its scratch for a quantized moment of n elements, as measured from the
        compiled kernels (inductor, CPU backend; the CUDA backend fuses on its own terms): 8-bit keeps an
        fp32 copy (4n) and the new scales (4n/block); 4-bit unpacks the codes (n/2 then n bytes) and
        keeps fp32 values (4n), int64 codes (8n) and the scales; fp8 keeps the new scales and, for some
        shapes (small matrices), the new codes (n): the model keeps both, the larger of the two patterns.
        Plain moments update in place."""
        block = int(o.get("block_size", default_block))
        ev: list[Event] = []
        for i, p in enumerate(ps):
            ev.append(MakeState(i))
            if not _ao_quantized(p, block):
                continue
            n, scale = p.numel, 4 * (p.numel // block)
            moments = range(len(_ao_keys(o)))
            keys: list[str] = []
            if kind == "4bit":
                ev += [Alloc(f"packed{m}", n // 2) for m in moments]
                ev += [Alloc(f"unpacked{m}", n) for m in moments]
                _free(ev, [f"packed{m}" for m in moments])
                keys += [f"unpacked{m}" for m in moments]
            sizes = {"8bit": [("f32", 4 * n)], "4bit": [("f32", 4 * n), ("i64", 8 * n)], "fp8": [("codes", n)]}[kind]
            ev += [Alloc(f"scale{m}", scale) for m in moments]
            keys += [f"scale{m}" for m in moments]
            for name, nbytes in sizes:
                ev += [Alloc(f"{name}{m}", nbytes) for m in moments]
                keys += [f"{name}{m}" for m in moments]
            _free(ev, keys)
        return ev

    return program


# ---------------------------------------------------------------------------------------------------------
# Lion (lion-pytorch: lion_pytorch.Lion, lion_pytorch.foreach.Lion, Lion(use_triton=True))


def _lion_layout(p: ParamSpec, o: Options) -> list[Buffer]:
    return [Buffer("exp_avg", p.shape, p.dtype)]


def _lion_program(ps: list[ParamSpec], o: Options) -> list[Event]:
    """for-loop (``update_fn``): ``exp_avg.clone().mul_(beta1).add(grad)`` holds the clone and the sum
    (2x the parameter) until the clone is dropped; the update lives until the function returns. The
    momentum is created lazily per parameter. foreach: ``updates = [t.clone() for t in exp_avgs]``, one
    copy of every parameter, after all momenta exist. fused (triton ``update_fn``): in place."""
    ev: list[Event] = []
    if o.implementation == "foreach":
        ev = _state_first(ps)
        _free(ev, _alloc_each(ev, ps, list(range(len(ps))), "update"))
        return ev
    for i, p in enumerate(ps):
        ev.append(MakeState(i))
        if o.implementation == "for-loop":
            ev += [Alloc("clone", p.nbytes), Alloc("update", p.nbytes), Free("clone"), Free("update")]
    return ev
