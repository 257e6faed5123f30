"""The GPU catalog: what memguard knows about a GPU model without having one.

``memguard check --gpu H100-80GB`` and the planner need a device's memory, compute capability and kernel
support on a machine that has no such GPU. This module is that table, and the only place those facts live;
``gpus.py`` maps a discovered device to its entry with :func:`match_device`. Nothing here touches NVML.

Where the numbers come from
---------------------------
``total_bytes``
    What NVML (``nvidia-smi --query-gpu=memory.total``) reports for the model on current data-center
    drivers (R535 and newer), e.g. ``NVIDIA A100-SXM4-80GB, 81920 MiB``, ``NVIDIA H100 80GB HBM3,
    81559 MiB``, ``NVIDIA H200, 143771 MiB``, ``NVIDIA B200, 183359 MiB``. GDDR6 data-center boards run
    with ECC on, which takes 1/16 of the memory (T4 15360 MiB, A10G 23028 MiB, L4 23034 MiB, L40S
    46068 MiB); workstation and gaming boards ship with ECC off. Drivers before R510 reported the usable
    size here instead (a V100-SXM2-16GB showed 16160 MiB with driver 460). For the AMD entries it is the
    nominal per-device HBM size (an MI250X is two devices of 64 GiB each).
``usable_bytes``
    What PyTorch can ever allocate: ``torch.cuda.get_device_properties(i).total_memory``, which is
    ``cudaMemGetInfo``'s total, i.e. ``total_bytes`` minus what the driver reserves for itself (about
    250-1100 MiB depending on the board). Values are published ``_CudaDeviceProperties`` printouts and
    out-of-memory messages ("GPU 0 has a total capacity of 79.11 GiB", which prints this number) for the
    same board, rounded down to a MiB. The reserve moves by tens of MiB between driver versions (T4:
    15079-15109 MiB over the years), so treat the value as +-0.5%; a discovered device's free memory is
    always preferred over the catalog.
``context_bytes``
    Device memory a process holds outside PyTorch's allocator once CUDA is initialised: the CUDA context
    with its kernel images. Since CUDA 11.7 kernels load lazily (PyTorch sets ``CUDA_MODULE_LOADING=LAZY``
    since 1.13), so the context is a few hundred MiB: PyTorch measured 287,047,680 bytes in use after a
    first 6.4 MB tensor with lazy loading against 666,632,192 bytes eager (pytorch/pytorch#86509); its
    maintainers quote ~300-400 MB (pytorch/pytorch#107667, #109888); an RTX 6000 Ada with PyTorch 2.10 and
    CUDA 13.0 showed 426 MiB after ``torch.cuda.mem_get_info`` alone (unslothai/unsloth-zoo#1053). We use
    400 MiB up to Ampere, 426 MiB for Ada and 512 MiB for Hopper and Blackwell; the last is an estimate
    (larger chips, more SMs), not a measurement. Without lazy loading (CUDA < 11.7 or
    ``CUDA_MODULE_LOADING=EAGER``) the context is several times larger: 1343 MiB on a V100 with CUDA 11.2
    (:data:`EAGER_CONTEXT_BYTES_V100`). cuBLAS/cuDNN workspaces are not part of it.
``attention``
    The ``scaled_dot_product_attention`` backends PyTorch can use: flash attention needs sm80 or newer,
    memory-efficient attention sm50 or newer, math always. On ROCm both fused kernels exist for CDNA2 and
    CDNA3 (AOTriton / composable kernel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from memguard.errors import InvalidArgumentError, closest, unknown_name
from memguard.units import MiB

EAGER_CONTEXT_BYTES_V100 = 1343 * MiB
"""CUDA context plus PyTorch's kernel images loaded eagerly: NVML "used" right after a first tiny tensor on
a Tesla V100-SXM2-16GB with CUDA 11.2, no lazy module loading (Hugging Face's "perf_train_gpu_one" guide;
shared/data/gpu_measurements_dev.yaml id hf_cal_context)."""

_CONTEXT_BY_ARCH = {
    "turing": 400 * MiB,
    "volta": 400 * MiB,
    "ampere": 400 * MiB,
    "ada": 426 * MiB,
    "hopper": 512 * MiB,
    "blackwell": 512 * MiB,
    "cdna2": 512 * MiB,
    "cdna3": 512 * MiB,
}
"""Typical context with lazy module loading; see the module docstring for the basis of each number.
The ROCm values are an assumption by analogy with Hopper, not a measurement."""


@dataclass(frozen=True)
class CatalogGPU:
    """One GPU model as memguard's planner needs it; all sizes in bytes."""

    name: str
    """Canonical name, e.g. ``"A100-80GB"``."""
    aliases: tuple[str, ...]
    """Other names users type for it (``"h100"``, ``"4090"``)."""
    nvml_names: tuple[str, ...]
    """The exact names NVML (and ``torch.cuda.get_device_name``) report for the model's variants."""
    vendor: str
    """``"nvidia"`` or ``"amd"``."""
    nvml: bool
    """Whether NVML can see it (False for AMD: :func:`memguard.device.gpus.discover` never reports one)."""
    total_bytes: int
    """Total memory as NVML reports it on current drivers (nominal HBM size for AMD)."""
    usable_bytes: int
    """What PyTorch can allocate at most: ``total_bytes`` minus the driver's reserve."""
    architecture: str
    """turing, volta, ampere, ada, hopper, blackwell, cdna2 or cdna3."""
    compute_capability: tuple[int, int]
    """CUDA compute capability; for AMD the (major, minor) PyTorch on ROCm reports (gfx90a: 9.0, gfx942: 9.4)."""
    bf16: bool
    """Native bfloat16 math (sm80+ on NVIDIA; CDNA2+ on AMD)."""
    attention: tuple[str, ...]
    """SDPA backends available, fastest first: ``"flash"``, ``"mem_efficient"``, ``"math"``."""
    context_bytes: int
    """Typical device memory of a CUDA context with lazy module loading, outside PyTorch's allocator."""

    @property
    def reserved_bytes(self) -> int:
        """Memory the driver keeps for itself: never available to any process."""
        return self.total_bytes - self.usable_bytes

    @property
    def arch(self) -> str:
        """The ``smXY`` tag the CUDA device model uses (``"sm80"``); ``"gfx"`` tags for AMD."""
        major, minor = self.compute_capability
        if self.vendor == "amd":
            return {"cdna2": "gfx90a", "cdna3": "gfx942"}[self.architecture]
        return f"sm{major}{minor}"


def _attention_for(cc: tuple[int, int]) -> tuple[str, ...]:
    """SDPA backends PyTorch ships for an NVIDIA compute capability."""
    kernels = []
    if cc >= (8, 0):
        kernels.append("flash")
    if cc >= (5, 0):
        kernels.append("mem_efficient")
    kernels.append("math")
    return tuple(kernels)


def _nvidia(
    name: str,
    nvml_names: tuple[str, ...],
    aliases: tuple[str, ...],
    total_mib: int,
    usable_mib: int,
    architecture: str,
    cc: tuple[int, int],
) -> CatalogGPU:
    """An NVIDIA entry; bf16, attention kernels and context size follow from the architecture."""
    return CatalogGPU(
        name=name,
        aliases=aliases,
        nvml_names=nvml_names,
        vendor="nvidia",
        nvml=True,
        total_bytes=total_mib * MiB,
        usable_bytes=usable_mib * MiB,
        architecture=architecture,
        compute_capability=cc,
        bf16=cc >= (8, 0),
        attention=_attention_for(cc),
        context_bytes=_CONTEXT_BY_ARCH[architecture],
    )


def _amd(name: str, nvml_names: tuple[str, ...], aliases: tuple[str, ...], total_mib: int, usable_mib: int,
         architecture: str, cc: tuple[int, int]) -> CatalogGPU:
    """An AMD Instinct entry: invisible to NVML, bf16 and both fused attention kernels on CDNA2+."""
    return CatalogGPU(
        name=name,
        aliases=aliases,
        nvml_names=nvml_names,
        vendor="amd",
        nvml=False,
        total_bytes=total_mib * MiB,
        usable_bytes=usable_mib * MiB,
        architecture=architecture,
        compute_capability=cc,
        bf16=True,
        attention=("flash", "mem_efficient", "math"),
        context_bytes=_CONTEXT_BY_ARCH[architecture],
    )


# usable MiB: torch total_memory / "total capacity" published for the board (see module docstring).
CATALOG: tuple[CatalogGPU, ...] = (
    # Tesla T4, 15360 MiB (ECC on); torch total_memory 15095-15109 MB over driver versions.
    _nvidia("T4", ("Tesla T4", "NVIDIA T4"), ("T4-16GB",), 15360, 15102, "turing", (7, 5)),
    # Driver >= R510 shows 16384 MiB; torch total_memory=16160MB (also what driver 460 showed as total).
    _nvidia("V100-16GB", ("Tesla V100-SXM2-16GB", "Tesla V100-PCIE-16GB", "Tesla V100-SXM2-16GB-LS"),
            ("V100-SXM2-16GB", "V100-PCIE-16GB"), 16384, 16160, "volta", (7, 0)),
    # 32768 MiB on current drivers; "31.75 GiB total capacity" in PyTorch's OOM message.
    _nvidia("V100-32GB", ("Tesla V100-SXM2-32GB", "Tesla V100-PCIE-32GB", "Tesla V100S-PCIE-32GB",
                          "Tesla V100-SXM3-32GB"),
            ("V100-SXM2-32GB", "V100S"), 32768, 32510, "volta", (7, 0)),
    # NVIDIA A10G, 23028 MiB (ECC on); torch total_memory=22587MB.
    _nvidia("A10G", ("NVIDIA A10G",), ("A10G-24GB",), 23028, 22587, "ampere", (8, 6)),
    # NVIDIA L4, 23034 MiB; "total capacity of 22.05 GiB".
    _nvidia("L4", ("NVIDIA L4",), ("L4-24GB",), 23034, 22579, "ada", (8, 9)),
    # NVIDIA L40S, 46068 MiB; torch total_memory=45589MB.
    _nvidia("L40S", ("NVIDIA L40S",), ("L40S-48GB",), 46068, 45589, "ada", (8, 9)),
    # 24576 MiB; torch total_memory=24259MB (24268MB on older drivers).
    _nvidia("RTX-3090", ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090"), ("3090", "RTX3090"),
            24576, 24259, "ampere", (8, 6)),
    # 24564 MiB; "23.68 GiB total capacity" on Linux (Windows' WDDM reports more and pages).
    _nvidia("RTX-4090", ("NVIDIA GeForce RTX 4090",), ("4090", "RTX4090"), 24564, 24248, "ada", (8, 9)),
    # 49140 MiB (ECC off by default); torch total_memory=48676MB.
    _nvidia("RTX-A6000", ("NVIDIA RTX A6000",), ("A6000",), 49140, 48676, "ampere", (8, 6)),
    # 40960 MiB; 42.41 GB (40445 MiB, "39.50 GiB total capacity") on current drivers, 40536 MiB on older.
    _nvidia("A100-40GB", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "A100-SXM4-40GB", "A100-PCIE-40GB"),
            ("A100-SXM4-40GB", "A100-PCIE-40GB"), 40960, 40445, "ampere", (8, 0)),
    # 81920 MiB; 85.09 GB (81148 MiB) reported by PyTorch 2.11 / CUDA 13.0.
    _nvidia("A100-80GB", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "A100-SXM4-80GB"),
            ("A100-SXM4-80GB", "A100-PCIE-80GB"), 81920, 81148, "ampere", (8, 0)),
    # NVIDIA H100 80GB HBM3, 81559 MiB; torch total_memory=81089MB.
    _nvidia("H100-80GB", ("NVIDIA H100 80GB HBM3",), ("H100", "H100-SXM", "H100-SXM5-80GB"),
            81559, 81089, "hopper", (9, 0)),
    # NVIDIA H100 PCIe, 81559 MiB; torch total_memory=81008MB.
    _nvidia("H100-PCIe", ("NVIDIA H100 PCIe",), ("H100-PCIe-80GB",), 81559, 81008, "hopper", (9, 0)),
    # NVIDIA H100 NVL, 95830 MiB; 99.9 GB (95270 MiB) reported by PyTorch.
    _nvidia("H100-NVL", ("NVIDIA H100 NVL",), ("H100-NVL-94GB",), 95830, 95270, "hopper", (9, 0)),
    # NVIDIA H200, 143771 MiB (141 GB HBM3e); torch total_memory=143156MB.
    _nvidia("H200", ("NVIDIA H200",), ("H200-141GB", "H200-SXM"), 143771, 143156, "hopper", (9, 0)),
    # NVIDIA GH200 480GB (96 GB HBM3 + 480 GB LPDDR5X), 97871 MiB; 101.47 GB (96769 MiB) reported by PyTorch.
    _nvidia("GH200", ("NVIDIA GH200 480GB",), ("GH200-96GB", "GH200-480GB"), 97871, 96769, "hopper", (9, 0)),
    # NVIDIA B200, 183359 MiB; torch total_memory=182642MB.
    _nvidia("B200", ("NVIDIA B200",), ("B200-192GB", "B200-180GB"), 183359, 182642, "blackwell", (10, 0)),
    # One MI250X is two devices (GCDs) of 64 GiB; PyTorch reports "total capacity of 63.98 GiB" per device.
    _amd("MI250X", ("AMD Instinct MI250X", "AMD Instinct MI250X/MI250"), ("MI250X-64GB",), 65536, 65515,
         "cdna2", (9, 0)),
    # 192 GiB HBM3; PyTorch reports "total capacity of 191.98 GiB".
    _amd("MI300X", ("AMD Instinct MI300X",), ("MI300X-192GB",), 196608, 196587, "cdna3", (9, 4)),
)

# ---------------------------------------------------------------------------------------------------------
# Forgiving names: NVML's "NVIDIA A100-SXM4-80GB", a user's "a100 80gb" and the canonical "A100-80GB" meet.

_VENDOR_WORDS = frozenset({"nvidia", "tesla", "geforce", "amd", "instinct"})
"""Words that never tell two catalog entries apart."""
_PACKAGING_WORDS = frozenset({"sxm", "sxm2", "sxm3", "sxm4", "sxm5", "hbm2", "hbm2e", "hbm3", "hbm3e", "gpu", "rtx"})
"""Form factor and memory type words; dropped at the second matching level."""
_BUS_WORDS = frozenset({"pcie", "pci", "e"})
"""Dropped only at the last level: "H100 PCIe" and "H100 SXM" are different entries."""


def _tokens(name: str) -> list[str]:
    """Lowercase alphanumeric words with memory sizes spelled one way ("80G" -> "80gb")."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    return [re.sub(r"^(\d+)g$", r"\1gb", w) for w in words]


def _key(name: str, level: int) -> str:
    """The name at a matching level: 0 drops vendor words, 1 also packaging, 2 also the bus."""
    drop = set(_VENDOR_WORDS)
    if level >= 1:
        drop |= _PACKAGING_WORDS
    if level >= 2:
        drop |= _BUS_WORDS
    return "".join(w for w in _tokens(name) if w not in drop)


_LEVELS = 3


def _build_index() -> list[dict[str, set[str]]]:
    """For each level, key -> canonical names of the entries that answer to it."""
    index: list[dict[str, set[str]]] = [{} for _ in range(_LEVELS)]
    for gpu in CATALOG:
        for spelling in (gpu.name, *gpu.aliases, *gpu.nvml_names):
            for level in range(_LEVELS):
                index[level].setdefault(_key(spelling, level), set()).add(gpu.name)
    return index


_INDEX = _build_index()
_BY_NAME = {gpu.name: gpu for gpu in CATALOG}


def names() -> list[str]:
    """Canonical names of every catalog entry, in catalog order."""
    return [gpu.name for gpu in CATALOG]


def _find(name: str) -> tuple[CatalogGPU | None, set[str]]:
    """The unique entry for ``name`` at the strictest level that knows it; else the candidates it could be.

    Candidates are the entries seen at any level plus, for a name that is the start of several entries'
    names ("A100" of "A100-40GB" and "A100-80GB"), those entries.
    """
    seen: set[str] = set()
    for level in range(_LEVELS):
        hits = _INDEX[level].get(_key(name, level), set())
        if len(hits) == 1:
            return _BY_NAME[next(iter(hits))], hits
        seen |= hits
    loose = _key(name, _LEVELS - 1)
    if len(loose) >= 2:
        seen |= {g for key, hits in _INDEX[_LEVELS - 1].items() if key.startswith(loose) for g in hits}
    return None, seen


def lookup(name: str) -> CatalogGPU:
    """The catalog entry for a GPU name, forgiving about case, separators and vendor words.

    ``"a100-80gb"``, ``"A100 80GB"``, ``"NVIDIA A100-SXM4-80GB"`` and ``"NVIDIA A100 80GB PCIe"`` all give
    the A100-80GB entry; ``"h100"`` the SXM H100. Names that fit several entries (``"A100"``: 40 or 80 GB?)
    and unknown names raise :class:`InvalidArgumentError` naming the valid names that fit or are closest.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"a GPU name must be a non-empty string, got {name!r}. Valid: {', '.join(names())}.")
    gpu, candidates = _find(name)
    if gpu is not None:
        return gpu
    if len(candidates) > 1:
        raise InvalidArgumentError(
            f"GPU name {name!r} is ambiguous: it fits {', '.join(sorted(candidates))}. Name one of them."
        )
    raise _unknown(name)


def _unknown(name: str) -> InvalidArgumentError:
    """An unknown-GPU error that suggests the nearest canonical names, also judging by aliases."""
    error = unknown_name("GPU", name, names())
    if "Did you mean" in str(error):
        return error
    # A mistyped alias ("a100 80 gbb") is closer to an alias key than to any canonical name.
    spellings = {_key(s, 1): gpu.name for gpu in CATALOG for s in (gpu.name, *gpu.aliases, *gpu.nvml_names)}
    near = list(dict.fromkeys(spellings[k] for k in closest(_key(name, 1), spellings)))
    if not near:
        return error
    hint = ", ".join(repr(n) for n in near)
    return InvalidArgumentError(f"unknown GPU {name!r}. Did you mean {hint}? Valid: {', '.join(sorted(names()))}.")


def match_device(info: Any) -> CatalogGPU | None:
    """The catalog entry for a discovered device (anything with NVML's ``name`` and ``total_bytes``,
    such as :class:`memguard.device.gpus.GPUInfo`); None for a model the catalog lacks."""
    return match_name(getattr(info, "name", None), getattr(info, "total_bytes", 0) or 0)


def match_name(name: Any, total: int = 0) -> CatalogGPU | None:
    """The catalog entry for an NVML device name. A name that fits several entries ("NVIDIA A100") is
    settled by the device's total memory: the entry whose ``total_bytes`` is within 5% of it."""
    if not isinstance(name, str) or not name.strip():
        return None
    gpu, candidates = _find(name)
    if gpu is not None:
        return gpu
    near = [_BY_NAME[c] for c in candidates if total and abs(_BY_NAME[c].total_bytes - total) <= 0.05 * total]
    return min(near, key=lambda g: abs(g.total_bytes - total)) if near else None


def entries(nvml: bool | None = None) -> list[CatalogGPU]:
    """Catalog entries, optionally only those NVML can (``True``) or cannot (``False``) see."""
    return [gpu for gpu in CATALOG if nvml is None or gpu.nvml == nvml]
