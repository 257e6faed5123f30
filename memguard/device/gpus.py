"""GPU discovery through NVML: which GPUs this process will use, and how much memory each has free.

This is the only module that talks to NVML (the ``pynvml`` module of the ``nvidia-ml-py`` distribution),
imported lazily so ``import memguard.device.gpus`` works everywhere. NVML answers without creating a CUDA
context, so discovering GPUs costs no device memory and cannot change what it measures; this module never
calls ``torch.cuda``.

"Visible" follows CUDA's own rules for ``CUDA_VISIBLE_DEVICES``:

- unset: every device NVML sees, in NVML (PCI bus) order. CUDA's default order is fastest-first, which is
  the same order on machines with identical GPUs; set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` to make it exact
  on mixed machines;
- a comma-separated list of indices (``"1,0"``), GPU UUIDs or unique UUID prefixes (``"GPU-8f3a"``), MIG
  device UUIDs (``"MIG-..."`` or the older ``"MIG-GPU-<uuid>/<gi>/<ci>"``). Like CUDA, the list ends at the
  first entry that names no device (or names one again), and only one MIG device is ever visible;
- empty: no GPU.

On top of that, ``devices`` picks from the visible set the way a Lightning Trainer does (``devices=[1, 3]``
are ``cuda:1`` and ``cuda:3``). Failures never raise: a missing library, driver or GPU comes back as
:attr:`Discovery.error`, and a device whose query fails as :attr:`GPUInfo.error` next to the healthy ones.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memguard.errors import InvalidArgumentError

NO_GPU = "no NVIDIA GPU visible"
DEFAULT_TIMEOUT_S = 15.0
"""NVML answers in milliseconds, or within a second when it loads; a GPU that fell off the bus can block a
query far longer. Past this, :func:`discover` gives up and reports it instead of hanging the caller."""

_MIG_ENABLED = 1  # pynvml.NVML_DEVICE_MIG_ENABLE


@dataclass(frozen=True)
class MigInstance:
    """One MIG device (a GPU instance with its compute instance) carved out of a MIG-enabled GPU."""

    index: int
    """Its MIG device index on the parent GPU."""
    uuid: str
    """``MIG-...``: what ``CUDA_VISIBLE_DEVICES`` accepts to select it."""
    name: str
    """NVML's name, e.g. ``"NVIDIA A100-SXM4-40GB MIG 3g.20gb"``."""
    total_bytes: int
    free_bytes: int
    used_bytes: int
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class GPUInfo:
    """A device this process can use, as NVML sees it now. Sizes in bytes.

    ``used_bytes`` is NVML's device-wide "used" (total minus free), so it includes what the driver reserves
    for itself, CUDA contexts and every process's allocations. ``free_bytes`` is what a new allocation can
    still get. When ``CUDA_VISIBLE_DEVICES`` selects a MIG device, the sizes are that MIG device's and
    ``mig`` holds only it (``selected_mig`` names it); for a whole MIG-enabled GPU they are the GPU's and
    ``mig`` lists all its instances.
    """

    index: int
    """The CUDA index this process sees (``cuda:<index>``)."""
    nvml_index: int
    """The index NVML and ``nvidia-smi`` use."""
    name: str
    uuid: str
    """The physical GPU's ``GPU-...`` UUID."""
    total_bytes: int = 0
    free_bytes: int = 0
    used_bytes: int = 0
    other_process_bytes: int = 0
    """Memory that processes other than this one hold on the device (0 when NVML cannot tell, as for
    processes in other containers or without permission)."""
    compute_capability: tuple[int, int] | None = None
    bf16: bool = False
    """Native bfloat16 math: compute capability 8.0 or newer."""
    mig_mode: bool = False
    mig: tuple[MigInstance, ...] = ()
    selected_mig: str | None = None
    """The MIG device UUID ``CUDA_VISIBLE_DEVICES`` selected, if any."""
    error: str | None = None
    """Why this device could not be (fully) queried; the other fields then hold what was learned."""


@dataclass(frozen=True)
class Discovery:
    """The result of :func:`discover`: the visible GPUs, or why there are none."""

    gpus: list[GPUInfo] = field(default_factory=list)
    error: str | None = None
    """Why no GPU is visible (``"no NVIDIA GPU visible: NVML library not found"``); None when any is."""

    @property
    def ok(self) -> bool:
        """At least one GPU was found and every found GPU answered."""
        return bool(self.gpus) and self.error is None and all(g.error is None for g in self.gpus)


# ---------------------------------------------------------------------------------------------------------
# Public entry point


def discover(
    devices: Sequence[int] | int | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Discovery:
    """The GPUs this process will use, with their current memory, from NVML.

    ``devices`` selects among the visible GPUs like a Lightning Trainer's ``devices``: None, ``"auto"`` or
    ``-1`` for all; an int ``n`` for the first ``n``; a list of visible indices (``[1, 3]``). ``env``
    replaces ``os.environ`` (for ``CUDA_VISIBLE_DEVICES``). Never raises for a missing library, driver or
    GPU; raises :class:`InvalidArgumentError` for a malformed ``devices``, or one that asks for GPUs that
    are not visible while others are.
    """
    wanted = _parse_devices(devices)
    env = os.environ if env is None else env
    visible_spec = env.get("CUDA_VISIBLE_DEVICES")
    if visible_spec is not None and not visible_spec.strip():
        return Discovery(error=f"{NO_GPU}: CUDA_VISIBLE_DEVICES is empty")
    found = _with_timeout(lambda: _query(visible_spec), timeout)
    if found.error is not None or not found.gpus:
        return found
    return Discovery(gpus=_select(found.gpus, wanted, devices))


# ---------------------------------------------------------------------------------------------------------
# devices= (Lightning's convention, relative to the visible set)


def _parse_devices(devices: Sequence[int] | int | str | None) -> list[int] | int | None:
    """None (all), a count, or explicit visible indices; anything else is an InvalidArgumentError."""
    if devices is None or devices == "auto" or devices == -1 or devices == "-1":
        return None
    if isinstance(devices, bool):
        raise InvalidArgumentError(f"devices must be an int, a list of ints or 'auto', got {devices!r}.")
    if isinstance(devices, int):
        if devices < 0:
            raise InvalidArgumentError(f"devices must be -1 (all), a count >= 0 or a list of indices, got {devices}.")
        return devices
    if isinstance(devices, str):
        return _parse_devices_str(devices)
    try:
        items = list(devices)
    except TypeError:
        raise InvalidArgumentError(f"devices must be an int, a list of ints or 'auto', got {devices!r}.") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise InvalidArgumentError(f"devices must list non-negative GPU indices, got {devices!r}.")
    if len(set(items)) != len(items):
        raise InvalidArgumentError(f"devices lists a GPU twice: {devices!r}.")
    return items


def _parse_devices_str(text: str) -> list[int] | int:
    """Lightning's strings: ``"2"`` is a count, ``"1,3"`` or ``"1,"`` are indices."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) == 1:
            return _parse_devices(int(parts[0]))  # type: ignore[return-value]
        return _parse_devices([int(p) for p in parts if p])  # type: ignore[return-value]
    except ValueError:
        message = f"devices must be 'auto', a count or comma-separated indices, got {text!r}."
        raise InvalidArgumentError(message) from None


def _select(gpus: list[GPUInfo], wanted: list[int] | int | None, devices: Any) -> list[GPUInfo]:
    """The visible GPUs ``devices`` asks for, keeping their visible index."""
    if wanted is None:
        return gpus
    if isinstance(wanted, int):
        if wanted > len(gpus):
            raise InvalidArgumentError(f"devices={devices!r} asks for {wanted} GPUs but {len(gpus)} are visible.")
        return gpus[:wanted]
    missing = [i for i in wanted if i >= len(gpus)]
    if missing:
        raise InvalidArgumentError(
            f"devices={devices!r} asks for GPU {', '.join(map(str, missing))} but only "
            f"{len(gpus)} {'is' if len(gpus) == 1 else 'are'} visible (indices 0-{len(gpus) - 1})."
        )
    return [gpus[i] for i in wanted]


# ---------------------------------------------------------------------------------------------------------
# NVML


def _with_timeout(query: Callable[[], Discovery], timeout: float) -> Discovery:
    """Run an NVML query on a daemon thread so a wedged driver cannot hang the caller."""
    box: list[Discovery] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            box.append(query())
        except BaseException as exc:  # reported below; a thread must not die silently
            failure.append(exc)

    thread = threading.Thread(target=run, name="memguard-nvml", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return Discovery(error=f"{NO_GPU}: NVML did not answer within {timeout:g} s")
    if failure:
        return Discovery(error=f"{NO_GPU}: NVML query failed ({type(failure[0]).__name__}: {failure[0]})")
    return box[0]


def _query(visible_spec: str | None) -> Discovery:
    """Initialise NVML, read the visible devices, shut NVML down."""
    try:
        import pynvml
    except ImportError:
        return Discovery(error=f"{NO_GPU}: the pynvml module is missing (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Discovery(error=f"{NO_GPU}: {_init_failure(pynvml, exc)}")
    except OSError as exc:  # a broken libnvidia-ml.so can fail to load with a plain OSError
        return Discovery(error=f"{NO_GPU}: NVML library could not be loaded ({exc})")
    try:
        return _enumerate(pynvml, visible_spec)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _init_failure(pynvml: Any, exc: Exception) -> str:
    """A short reason for an nvmlInit failure."""
    reasons = [
        ("NVMLError_LibraryNotFound", "NVML library not found"),
        ("NVMLError_DriverNotLoaded", "NVML driver not loaded"),
        ("NVMLError_NoPermission", "no permission to use NVML"),
        ("NVMLError_LibRmVersionMismatch", "NVML library and driver versions do not match"),
    ]
    for cls_name, reason in reasons:
        cls = getattr(pynvml, cls_name, None)
        if cls is not None and isinstance(exc, cls):
            return reason
    return f"NVML failed to initialise ({exc})"


@dataclass
class _Physical:
    """One NVML device as enumerated, before CUDA_VISIBLE_DEVICES is applied."""

    nvml_index: int
    handle: Any = None
    uuid: str = ""
    error: str | None = None
    mig_mode: bool = False
    mig: list[MigInstance] = field(default_factory=list)


def _enumerate(pynvml: Any, visible_spec: str | None) -> Discovery:
    """Read every NVML device, then keep the ones CUDA_VISIBLE_DEVICES makes visible."""
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        return Discovery(error=f"{NO_GPU}: NVML could not count devices ({exc})")
    if count == 0:
        return Discovery(error=f"{NO_GPU}: NVML reports no devices")
    physical = [_physical(pynvml, i) for i in range(count)]
    selection = _visible(physical, visible_spec)
    if not selection:
        return Discovery(
            error=f"{NO_GPU}: CUDA_VISIBLE_DEVICES={visible_spec!r} selects none of the {count} devices NVML sees"
        )
    own_pid = os.getpid()
    gpus = [_describe(pynvml, physical[n], index, mig, own_pid) for index, (n, mig) in enumerate(selection)]
    return Discovery(gpus=gpus)


def _physical(pynvml: Any, nvml_index: int) -> _Physical:
    """A handle and UUID for one device (what CUDA_VISIBLE_DEVICES can refer to), and its MIG devices."""
    dev = _Physical(nvml_index)
    try:
        dev.handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        dev.uuid = _text(pynvml.nvmlDeviceGetUUID(dev.handle))
    except pynvml.NVMLError as exc:
        dev.error = f"NVML query failed: {exc}"
        return dev
    dev.mig_mode = _mig_enabled(pynvml, dev.handle)
    if dev.mig_mode:
        dev.mig = _mig_instances(pynvml, dev.handle)
    return dev


def _mig_enabled(pynvml: Any, handle: Any) -> bool:
    """Whether MIG mode is on now (False on GPUs without MIG support)."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except (pynvml.NVMLError, AttributeError):
        return False
    return current == getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", _MIG_ENABLED)


def _mig_instances(pynvml: Any, handle: Any) -> list[MigInstance]:
    """The MIG devices that exist on a MIG-enabled GPU (empty slots are skipped)."""
    instances = []
    try:
        slots = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except pynvml.NVMLError:
        return []
    for slot in range(slots):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            memory = pynvml.nvmlDeviceGetMemoryInfo(mig)
            instances.append(
                MigInstance(
                    index=slot,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(mig)),
                    name=_text(pynvml.nvmlDeviceGetName(mig)),
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    used_bytes=int(memory.used),
                    gpu_instance_id=_optional(pynvml, "nvmlDeviceGetGpuInstanceId", mig),
                    compute_instance_id=_optional(pynvml, "nvmlDeviceGetComputeInstanceId", mig),
                )
            )
        except pynvml.NVMLError:
            continue
    return instances


def _optional(pynvml: Any, function: str, handle: Any) -> int | None:
    """An NVML integer query that may be missing or unsupported."""
    try:
        return int(getattr(pynvml, function)(handle))
    except (pynvml.NVMLError, AttributeError, TypeError, ValueError):
        return None


def _text(value: str | bytes) -> str:
    """NVML strings: ``str`` from nvidia-ml-py, ``bytes`` from some older bindings."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


def _visible(physical: list[_Physical], spec: str | None) -> list[tuple[int, MigInstance | None]]:
    """(position in ``physical``, selected MIG device or None) for each visible device, in CUDA order."""
    if spec is None:
        return [(i, None) for i in range(len(physical))]
    selection: list[tuple[int, MigInstance | None]] = []
    seen: set[tuple[int, str | None]] = set()
    for entry in (e.strip() for e in spec.split(",")):
        hit = _resolve(physical, entry)
        if hit is None:
            break  # CUDA ignores everything from the first entry that names no device
        key = (hit[0], hit[1].uuid if hit[1] else None)
        if key in seen:
            break
        if hit[1] is not None and any(m is not None for _, m in selection):
            break  # CUDA enumerates at most one MIG device per process
        seen.add(key)
        selection.append(hit)
    return selection


def _resolve(physical: list[_Physical], entry: str) -> tuple[int, MigInstance | None] | None:
    """The device one CUDA_VISIBLE_DEVICES entry names, or None when it names none (or several)."""
    if entry.isdigit():
        index = int(entry)
        return (index, None) if index < len(physical) else None
    lowered = entry.lower()
    if lowered.startswith("gpu-"):
        hits = [i for i, d in enumerate(physical) if d.uuid.lower().startswith(lowered)]
        return (hits[0], None) if len(hits) == 1 else None
    if lowered.startswith("mig-gpu-"):
        return _resolve_legacy_mig(physical, entry)
    if lowered.startswith("mig-"):
        hits = [(i, m) for i, d in enumerate(physical) for m in d.mig if m.uuid.lower().startswith(lowered)]
        return hits[0] if len(hits) == 1 else None
    return None


def _resolve_legacy_mig(physical: list[_Physical], entry: str) -> tuple[int, MigInstance | None] | None:
    """``MIG-GPU-<uuid>/<gpu instance>/<compute instance>``, the pre-R470 MIG spelling."""
    parts = entry[len("MIG-"):].split("/")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    gpu_uuid, gi, ci = parts[0].lower(), int(parts[1]), int(parts[2])
    hits = [
        (i, m)
        for i, d in enumerate(physical)
        if d.uuid.lower().startswith(gpu_uuid)
        for m in d.mig
        if m.gpu_instance_id == gi and m.compute_instance_id == ci
    ]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------------------
# One device


def _describe(pynvml: Any, dev: _Physical, index: int, selected: MigInstance | None, own_pid: int) -> GPUInfo:
    """Everything memguard needs about one visible device; a failing query becomes ``error``."""
    if dev.error is not None:
        return GPUInfo(index=index, nvml_index=dev.nvml_index, name="unknown", uuid=dev.uuid, error=dev.error)
    handle = dev.handle
    name = "unknown"
    try:
        name = _text(pynvml.nvmlDeviceGetName(handle))
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    except pynvml.NVMLError as exc:
        return GPUInfo(index=index, nvml_index=dev.nvml_index, name=name, uuid=dev.uuid,
                       mig_mode=dev.mig_mode, mig=tuple(dev.mig), error=f"NVML query failed: {exc}")
    cc = _compute_capability(pynvml, handle, name, int(memory.total))
    sizes = (int(memory.total), int(memory.free), int(memory.used))
    if selected is not None:
        sizes = (selected.total_bytes, selected.free_bytes, selected.used_bytes)
    return GPUInfo(
        index=index,
        nvml_index=dev.nvml_index,
        name=name,
        uuid=dev.uuid,
        total_bytes=sizes[0],
        free_bytes=sizes[1],
        used_bytes=sizes[2],
        other_process_bytes=0 if selected is not None else _other_process_bytes(pynvml, handle, own_pid),
        compute_capability=cc,
        bf16=cc is not None and cc >= (8, 0),
        mig_mode=dev.mig_mode,
        mig=(selected,) if selected is not None else tuple(dev.mig),
        selected_mig=selected.uuid if selected is not None else None,
    )


def _compute_capability(pynvml: Any, handle: Any, name: str, total: int) -> tuple[int, int] | None:
    """NVML's compute capability, or the catalog's for the model when NVML cannot say."""
    try:
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except (pynvml.NVMLError, AttributeError):
        pass
    from memguard.device.catalog import match_name

    entry = match_name(name, total)
    return entry.compute_capability if entry is not None else None


def _other_process_bytes(pynvml: Any, handle: Any, own_pid: int) -> int:
    """Bytes held by other processes' compute and graphics contexts on the device.

    A process listed by both queries counts once. NVML reports ``usedGpuMemory`` as None where it cannot
    see (other containers, missing permission); those count as 0, so this is a lower bound. Inside a
    container NVML may list host PIDs, so a process that already holds a CUDA context can count itself.
    """
    by_pid: dict[int, int] = {}
    for function in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            processes = getattr(pynvml, function)(handle)
        except (pynvml.NVMLError, AttributeError):
            continue
        for proc in processes:
            pid = getattr(proc, "pid", None)
            used = getattr(proc, "usedGpuMemory", None)
            if pid is None or pid == own_pid or not isinstance(used, int):
                continue
            by_pid[pid] = max(by_pid.get(pid, 0), used)
    return sum(by_pid.values())
