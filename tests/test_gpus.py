"""memguard.device.gpus: discovery through NVML, checked against a fake ``pynvml`` at the module boundary.

The fake (``build`` / ``install`` below, also used by test_cli_gpus.py) implements the NVML functions
memguard.device.gpus calls over devices described in Python, and replaces ``sys.modules["pynvml"]`` so the lazy
import inside memguard.device.gpus finds it. Handles are tuples so the fake can read them back.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

import memguard.device.gpus as gpus
from memguard.errors import InvalidArgumentError
from memguard.device.gpus import NO_GPU, Discovery, GPUInfo, MigInstance, discover

MiB = 2**20
GiB = 2**30


class NVMLError(Exception):
    """Like pynvml's: ``str()`` is NVML's error string."""

    message = "Unknown Error"

    def __str__(self) -> str:
        return self.message


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's spelling
    message = "NVML Shared Library Not Found"


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801
    message = "Driver Not Loaded"


class NVMLError_NotFound(NVMLError):  # noqa: N801
    message = "Not Found"


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    message = "Not Supported"


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    message = "GPU is lost"


class NVMLError_NoPermission(NVMLError):  # noqa: N801
    message = "Insufficient Permissions"


@dataclass
class FakeMig:
    uuid: str
    name: str
    total: int
    free: int
    gpu_instance: int
    compute_instance: int = 0


@dataclass
class FakeGPU:
    name: str
    uuid: str
    total: int
    free: int
    cc: tuple[int, int] = (8, 0)
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    """(pid, usedGpuMemory) of compute processes."""
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    mig: dict[int, FakeMig] | None = None
    """MIG slot -> device when MIG mode is on; None when off."""
    max_mig: int = 7
    fail: dict[str, type[NVMLError]] = field(default_factory=dict)
    """NVML function name -> error it raises for this device."""


@dataclass
class FakeState:
    """What the fake saw: how often NVML was initialised and shut down."""

    inits: int = 0
    shutdowns: int = 0
    gate: threading.Event | None = None


def build(devices: list[FakeGPU], init_error: type[NVMLError] | None = None,
          state: FakeState | None = None) -> tuple[types.ModuleType, FakeState]:
    """A module object that behaves like pynvml over ``devices``."""
    state = state or FakeState()
    m = types.ModuleType("pynvml")
    for cls in (NVMLError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, NVMLError_NotFound,
                NVMLError_NotSupported, NVMLError_GpuIsLost, NVMLError_NoPermission):
        setattr(m, cls.__name__, cls)
    m.NVML_DEVICE_MIG_ENABLE = 1

    def gpu(handle: tuple) -> FakeGPU:
        return devices[handle[1]]

    def check(handle: tuple, function: str) -> None:
        error = gpu(handle).fail.get(function)
        if error is not None:
            raise error()

    def mig_of(handle: tuple) -> FakeMig:
        return gpu(handle).mig[handle[2]]  # type: ignore[index]

    def nvmlInit() -> None:
        if state.gate is not None:
            state.gate.wait(5)
        if init_error is not None:
            raise init_error()
        state.inits += 1

    def nvmlShutdown() -> None:
        state.shutdowns += 1

    def nvmlDeviceGetCount() -> int:
        return len(devices)

    def nvmlDeviceGetHandleByIndex(index: int) -> tuple:
        if "nvmlDeviceGetHandleByIndex" in devices[index].fail:
            raise devices[index].fail["nvmlDeviceGetHandleByIndex"]()
        return ("gpu", index)

    def nvmlDeviceGetUUID(handle: tuple) -> str:
        if handle[0] == "mig":
            return mig_of(handle).uuid
        check(handle, "nvmlDeviceGetUUID")
        return gpu(handle).uuid

    def nvmlDeviceGetName(handle: tuple) -> str:
        if handle[0] == "mig":
            return mig_of(handle).name
        check(handle, "nvmlDeviceGetName")
        return gpu(handle).name

    def nvmlDeviceGetMemoryInfo(handle: tuple) -> SimpleNamespace:
        if handle[0] == "mig":
            d = mig_of(handle)
        else:
            check(handle, "nvmlDeviceGetMemoryInfo")
            d = gpu(handle)
        return SimpleNamespace(total=d.total, free=d.free, used=d.total - d.free)

    def nvmlDeviceGetCudaComputeCapability(handle: tuple) -> tuple[int, int]:
        check(handle, "nvmlDeviceGetCudaComputeCapability")
        return gpu(handle).cc

    def processes(kind: str) -> Callable[[tuple], list[SimpleNamespace]]:
        def query(handle: tuple) -> list[SimpleNamespace]:
            check(handle, f"nvmlDevice{kind}")
            entries = getattr(gpu(handle), "compute" if kind == "GetComputeRunningProcesses" else "graphics")
            return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in entries]

        return query

    def nvmlDeviceGetMigMode(handle: tuple) -> list[int]:
        check(handle, "nvmlDeviceGetMigMode")
        if gpu(handle).mig is None:
            raise NVMLError_NotSupported()
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(handle: tuple) -> int:
        return gpu(handle).max_mig

    def nvmlDeviceGetMigDeviceHandleByIndex(handle: tuple, slot: int) -> tuple:
        if slot not in (gpu(handle).mig or {}):
            raise NVMLError_NotFound()
        return ("mig", handle[1], slot)

    def nvmlDeviceGetGpuInstanceId(handle: tuple) -> int:
        return mig_of(handle).gpu_instance

    def nvmlDeviceGetComputeInstanceId(handle: tuple) -> int:
        return mig_of(handle).compute_instance

    for name, value in list(locals().items()):
        if name.startswith("nvml"):
            setattr(m, name, value)
    m.nvmlDeviceGetComputeRunningProcesses = processes("GetComputeRunningProcesses")
    m.nvmlDeviceGetGraphicsRunningProcesses = processes("GetGraphicsRunningProcesses")
    return m, state


def install(monkeypatch: pytest.MonkeyPatch, devices: list[FakeGPU], init_error: type[NVMLError] | None = None,
            state: FakeState | None = None) -> FakeState:
    """Make ``import pynvml`` return the fake for the rest of the test."""
    module, state = build(devices, init_error, state)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return state


# ---------------------------------------------------------------------------------------------------------
# A machine with four GPUs: idle, busy with other processes, MIG-enabled with 2 instances, and one lost.

OWN_PID = os.getpid()
MIG_3G = FakeMig("MIG-1111aaaa-0000-5000-8000-000000000001", "NVIDIA A100-SXM4-40GB MIG 3g.20gb",
                 19968 * MiB, 19900 * MiB, gpu_instance=1)
MIG_2G = FakeMig("MIG-2222bbbb-0000-5000-8000-000000000002", "NVIDIA A100-SXM4-40GB MIG 2g.10gb",
                 9728 * MiB, 9000 * MiB, gpu_instance=5)


def machine() -> list[FakeGPU]:
    return [
        FakeGPU("NVIDIA A100-SXM4-80GB", "GPU-aaaa1111-2222-3333-4444-555555555555", 81920 * MiB, 81251 * MiB),
        FakeGPU(
            "NVIDIA A100-SXM4-80GB", "GPU-bbbb1111-2222-3333-4444-555555555555", 81920 * MiB, 40 * GiB,
            compute=[(4242, 30 * GiB), (OWN_PID, 2 * GiB), (5151, None)],
            graphics=[(4242, 30 * GiB), (6363, 1 * GiB)],
        ),
        FakeGPU("NVIDIA A100-SXM4-40GB", "GPU-cccc1111-2222-3333-4444-555555555555", 40960 * MiB, 10 * GiB,
                mig={0: MIG_3G, 2: MIG_2G}),
        FakeGPU("NVIDIA H100 80GB HBM3", "GPU-dddd1111-2222-3333-4444-555555555555", 81559 * MiB, 80 * GiB,
                cc=(9, 0), fail={"nvmlDeviceGetMemoryInfo": NVMLError_GpuIsLost}),
    ]


@pytest.fixture
def four(monkeypatch: pytest.MonkeyPatch) -> FakeState:
    return install(monkeypatch, machine())


def test_every_field_of_every_gpu(four: FakeState) -> None:
    found = discover(env={})
    assert found.error is None
    assert [g.index for g in found.gpus] == [0, 1, 2, 3]
    assert [g.nvml_index for g in found.gpus] == [0, 1, 2, 3]
    idle, busy, mig, lost = found.gpus

    assert idle == GPUInfo(
        index=0, nvml_index=0, name="NVIDIA A100-SXM4-80GB", uuid="GPU-aaaa1111-2222-3333-4444-555555555555",
        total_bytes=81920 * MiB, free_bytes=81251 * MiB, used_bytes=669 * MiB, other_process_bytes=0,
        compute_capability=(8, 0), bf16=True, mig_mode=False, mig=(), selected_mig=None, error=None,
    )
    # 4242 counts once although it is in both lists, this process and unknown sizes not at all.
    assert busy.other_process_bytes == 31 * GiB
    assert busy.free_bytes == 40 * GiB and busy.used_bytes == 81920 * MiB - 40 * GiB

    assert mig.mig_mode is True and mig.selected_mig is None
    assert mig.total_bytes == 40960 * MiB and mig.free_bytes == 10 * GiB
    assert mig.mig == (
        MigInstance(0, MIG_3G.uuid, MIG_3G.name, 19968 * MiB, 19900 * MiB, 68 * MiB, gpu_instance_id=1,
                    compute_instance_id=0),
        MigInstance(2, MIG_2G.uuid, MIG_2G.name, 9728 * MiB, 9000 * MiB, 728 * MiB, gpu_instance_id=5,
                    compute_instance_id=0),
    )

    assert lost.error == "NVML query failed: GPU is lost"
    assert lost.name == "NVIDIA H100 80GB HBM3" and lost.uuid.startswith("GPU-dddd")
    assert (lost.total_bytes, lost.free_bytes, lost.compute_capability, lost.bf16) == (0, 0, None, False)
    assert found.ok is False  # one device failed; the others are still there


def test_nvml_is_shut_down_after_each_discovery(four: FakeState) -> None:
    discover(env={})
    discover(env={"CUDA_VISIBLE_DEVICES": "1"})
    assert (four.inits, four.shutdowns) == (2, 2)


def test_healthy_machine_is_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, machine()[:2])
    found = discover(env={})
    assert found.ok and len(found.gpus) == 2


def test_a_device_whose_handle_fails_is_reported_next_to_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = machine()[:2]
    devices[0].fail["nvmlDeviceGetHandleByIndex"] = NVMLError_GpuIsLost
    install(monkeypatch, devices)
    first, second = discover(env={}).gpus
    assert (first.index, first.name, first.error) == (0, "unknown", "NVML query failed: GPU is lost")
    assert second.error is None and second.name == "NVIDIA A100-SXM4-80GB"


def test_process_queries_that_fail_count_as_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = machine()[1:2]
    devices[0].fail["nvmlDeviceGetComputeRunningProcesses"] = NVMLError_NoPermission
    install(monkeypatch, devices)
    (busy,) = discover(env={}).gpus
    assert busy.error is None and busy.other_process_bytes == 31 * GiB  # the graphics list alone: 30 + 1 GiB


def test_compute_capability_falls_back_to_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = machine()[:1]
    devices[0].fail["nvmlDeviceGetCudaComputeCapability"] = NVMLError_NotSupported
    install(monkeypatch, devices)
    (gpu,) = discover(env={}).gpus
    assert gpu.compute_capability == (8, 0) and gpu.bf16 is True and gpu.error is None


# ---------------------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


def visible(spec: str) -> Discovery:
    return discover(env={"CUDA_VISIBLE_DEVICES": spec})


def test_indices_reorder_and_renumber(four: FakeState) -> None:
    found = visible("1,0")
    assert [(g.index, g.nvml_index, g.uuid[:8]) for g in found.gpus] == [(0, 1, "GPU-bbbb"), (1, 0, "GPU-aaaa")]
    assert found.gpus[0].other_process_bytes == 31 * GiB


def test_spaces_around_entries_are_ignored(four: FakeState) -> None:
    assert [g.nvml_index for g in visible(" 2 , 0 ").gpus] == [2, 0]


def test_full_uuids_and_unique_prefixes(four: FakeState) -> None:
    found = visible("GPU-cccc1111-2222-3333-4444-555555555555,GPU-aaaa")
    assert [(g.index, g.nvml_index) for g in found.gpus] == [(0, 2), (1, 0)]
    assert [g.nvml_index for g in visible("gpu-BBBB").gpus] == [1]  # CUDA compares UUIDs case-insensitively


def test_an_ambiguous_uuid_prefix_selects_nothing(four: FakeState) -> None:
    found = visible("GPU-")
    assert found.gpus == []
    assert found.error == f"{NO_GPU}: CUDA_VISIBLE_DEVICES='GPU-' selects none of the 4 devices NVML sees"


def test_mig_uuid_selects_that_instance_with_its_memory(four: FakeState) -> None:
    (gpu,) = visible(MIG_2G.uuid).gpus
    assert (gpu.index, gpu.nvml_index, gpu.name) == (0, 2, "NVIDIA A100-SXM4-40GB")
    assert gpu.uuid == "GPU-cccc1111-2222-3333-4444-555555555555"
    assert (gpu.total_bytes, gpu.free_bytes, gpu.used_bytes) == (9728 * MiB, 9000 * MiB, 728 * MiB)
    assert gpu.mig_mode is True and gpu.selected_mig == MIG_2G.uuid
    assert [m.uuid for m in gpu.mig] == [MIG_2G.uuid]
    assert gpu.other_process_bytes == 0 and gpu.compute_capability == (8, 0) and gpu.bf16


def test_mig_uuid_prefix_and_legacy_spelling(four: FakeState) -> None:
    assert visible("MIG-1111").gpus[0].selected_mig == MIG_3G.uuid
    legacy = visible("MIG-GPU-cccc1111-2222-3333-4444-555555555555/5/0")
    assert legacy.gpus[0].selected_mig == MIG_2G.uuid
    assert visible("MIG-GPU-cccc1111-2222-3333-4444-555555555555/9/0").gpus == []


def test_only_one_mig_device_is_visible(four: FakeState) -> None:
    found = visible(f"{MIG_3G.uuid},{MIG_2G.uuid}")
    assert [g.selected_mig for g in found.gpus] == [MIG_3G.uuid]


def test_empty_means_no_gpu_without_touching_nvml(four: FakeState) -> None:
    for spec in ("", "  "):
        found = visible(spec)
        assert (found.gpus, found.ok) == ([], False)
        assert found.error == "no NVIDIA GPU visible: CUDA_VISIBLE_DEVICES is empty"
    assert four.inits == 0


def test_the_list_ends_at_the_first_invalid_or_repeated_entry(four: FakeState) -> None:
    assert [g.nvml_index for g in visible("0,7,1").gpus] == [0]
    assert [g.nvml_index for g in visible("1,1,0").gpus] == [1]
    assert [g.nvml_index for g in visible("2,GPU-ffff,0").gpus] == [2]
    assert visible("-1").gpus == [] and "selects none" in visible("-1").error
    assert visible("NoDevFiles").gpus == []


def test_os_environ_is_the_default(four: FakeState, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert [g.nvml_index for g in discover().gpus] == [3, 1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(discover().gpus) == 4


# ---------------------------------------------------------------------------------------------------------
# devices= like a Lightning Trainer, relative to the visible set


def test_devices_list_picks_visible_indices(four: FakeState) -> None:
    found = discover([1, 3], env={"CUDA_VISIBLE_DEVICES": "3,2,1,0"})
    assert [(g.index, g.nvml_index) for g in found.gpus] == [(1, 2), (3, 0)]


@pytest.mark.parametrize(
    ("devices", "expected"),
    [(None, [0, 1, 2, 3]), ("auto", [0, 1, 2, 3]), (-1, [0, 1, 2, 3]), (2, [0, 1]), ("2", [0, 1]),
     ("1,", [1]), ("0, 2", [0, 2]), ([3], [3]), ((2, 0), [2, 0]), (0, [])],
)
def test_devices_forms(four: FakeState, devices: object, expected: list[int]) -> None:
    assert [g.index for g in discover(devices, env={}).gpus] == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("devices", "message"),
    [([0, 5], r"asks for GPU 5 but only 4 are visible \(indices 0-3\)"), (5, "asks for 5 GPUs but 4 are visible"),
     ([1, 1], "lists a GPU twice"), ([-2], "non-negative"), (-3, "-1 \\(all\\)"), ("x", "comma-separated"),
     (True, "an int"), (1.5, "an int"), ([0.5], "non-negative")],
)
def test_bad_devices_raise(four: FakeState, devices: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        discover(devices, env={})  # type: ignore[arg-type]


def test_devices_beyond_the_machine_do_not_raise_without_any_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [], init_error=NVMLError_LibraryNotFound)
    assert discover([1, 3], env={}).error == "no NVIDIA GPU visible: NVML library not found"


# ---------------------------------------------------------------------------------------------------------
# No GPU: every way there can be none is a message, never an exception


@pytest.mark.parametrize(
    ("error", "message"),
    [(NVMLError_LibraryNotFound, "NVML library not found"), (NVMLError_DriverNotLoaded, "NVML driver not loaded"),
     (NVMLError_NoPermission, "no permission to use NVML"), (NVMLError, "NVML failed to initialise (Unknown Error)")],
)
def test_nvml_init_failures(monkeypatch: pytest.MonkeyPatch, error: type[NVMLError], message: str) -> None:
    state = install(monkeypatch, machine(), init_error=error)
    found = discover(env={})
    assert (found.gpus, found.error, found.ok) == ([], f"no NVIDIA GPU visible: {message}", False)
    assert state.shutdowns == 0


def test_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    state = install(monkeypatch, [])
    assert discover(env={}).error == "no NVIDIA GPU visible: NVML reports no devices"
    assert state.shutdowns == 1


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    found = discover(env={})
    assert found.gpus == [] and found.error is not None
    assert found.error.startswith(NO_GPU) and "pip install nvidia-ml-py" in found.error


def test_a_hanging_nvml_is_reported_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    state = FakeState(gate=threading.Event())
    install(monkeypatch, machine(), state=state)
    try:
        found = discover(env={}, timeout=0.05)
    finally:
        state.gate.set()  # type: ignore[union-attr]
    assert found.gpus == [] and found.error == "no NVIDIA GPU visible: NVML did not answer within 0.05 s"


def test_importing_the_module_needs_no_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # any `import pynvml` now fails
    spec = importlib.util.spec_from_file_location("memguard_gpus_copy", gpus.__file__)
    copy = importlib.util.module_from_spec(spec)  # a fresh copy, so memguard.device.gpus itself stays untouched
    monkeypatch.setitem(sys.modules, "memguard_gpus_copy", copy)
    spec.loader.exec_module(copy)
    assert not hasattr(copy, "pynvml")
    error = copy.discover(env={}).error
    assert error == "no NVIDIA GPU visible: the pynvml module is missing (pip install nvidia-ml-py)"


def test_discovery_never_touches_torch_cuda(four: FakeState, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("discover() must not initialise CUDA")

    for name in ("init", "is_available", "device_count", "mem_get_info", "get_device_properties", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    assert len(discover(env={}).gpus) == 4


def test_this_machine_answers_without_raising() -> None:
    found = discover()
    assert found.gpus or (found.error or "").startswith(NO_GPU)
