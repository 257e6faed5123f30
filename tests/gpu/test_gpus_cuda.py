"""memguard.device.gpus against the real thing: NVML's view must agree with what CUDA tells PyTorch."""

from __future__ import annotations

import pytest
import torch

from memguard.device.catalog import match_device
from memguard.device.gpus import discover

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)"),
]

MiB = 2**20


def _visible_uuid(index: int) -> str:
    """The UUID CUDA gives device ``index``, spelled like NVML ("GPU-..."; MIG devices "MIG-...")."""
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def test_discovery_sees_the_devices_cuda_sees() -> None:
    torch.cuda.init()  # create the context first, so NVML and CUDA look at the same state
    found = discover()
    assert found.error is None
    assert len(found.gpus) == torch.cuda.device_count()
    for gpu in found.gpus:
        assert gpu.error is None
        assert gpu.name == torch.cuda.get_device_name(gpu.index)
        assert gpu.compute_capability == torch.cuda.get_device_capability(gpu.index)
        assert gpu.bf16 == (gpu.compute_capability >= (8, 0))
        expected = gpu.selected_mig or gpu.uuid
        assert _visible_uuid(gpu.index).lower() == expected.lower()


def test_memory_agrees_with_cuda_mem_get_info() -> None:
    for gpu in discover().gpus:
        free, total = torch.cuda.mem_get_info(gpu.index)
        again = discover([gpu.index]).gpus[0]
        # CUDA's total leaves out what the driver reserves: a few hundred MiB, never more than NVML's total.
        assert total <= again.total_bytes and again.total_bytes - total < 1536 * MiB
        # Both read the same free memory; allow for other processes allocating in between.
        assert abs(again.free_bytes - free) < 256 * MiB, (again.free_bytes, free)
        assert again.used_bytes == again.total_bytes - again.free_bytes


def test_the_catalog_knows_this_gpu() -> None:
    for gpu in discover().gpus:
        entry = match_device(gpu)
        if entry is None:
            pytest.skip(f"{gpu.name} is not in the catalog")
        props = torch.cuda.get_device_properties(gpu.index)
        assert entry.compute_capability == (props.major, props.minor)
        if gpu.selected_mig is None:
            # Within 2% / 1%: drivers before R510 reported the usable size as NVML's total, and the driver's
            # reserve moves by tens of MiB between versions.
            assert abs(entry.total_bytes - gpu.total_bytes) <= 0.02 * gpu.total_bytes
            assert abs(entry.usable_bytes - props.total_memory) <= 0.01 * props.total_memory
