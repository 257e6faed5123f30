"""memguard.device.catalog: the table's invariants, a few facts checked by hand, and forgiving name lookup."""

from __future__ import annotations

import pytest

from memguard.errors import InvalidArgumentError
from memguard.device.catalog import (
    CATALOG,
    EAGER_CONTEXT_BYTES_V100,
    CatalogGPU,
    entries,
    lookup,
    match_device,
    names,
)
from memguard.device.catalog import _INDEX as INDEX
from memguard.device.gpus import GPUInfo

MiB = 2**20
GiB = 2**30

REQUIRED = [
    "T4", "V100-16GB", "V100-32GB", "A10G", "L4", "L40S", "RTX-3090", "RTX-4090", "RTX-A6000", "A100-40GB",
    "A100-80GB", "H100-80GB", "H100-PCIe", "H100-NVL", "H200", "GH200", "B200", "MI250X", "MI300X",
]
ARCHITECTURES = {"turing", "volta", "ampere", "ada", "hopper", "blackwell", "cdna2", "cdna3"}


def test_the_catalog_has_the_common_training_gpus() -> None:
    assert set(REQUIRED) <= set(names())
    assert len(names()) == len(set(names()))
    assert {g.name for g in entries(nvml=False)} == {"MI250X", "MI300X"}
    assert all(g.vendor == "amd" for g in entries(nvml=False))
    assert all(g.vendor == "nvidia" for g in entries(nvml=True))


@pytest.mark.parametrize("gpu", CATALOG, ids=lambda g: g.name)
def test_entry_invariants(gpu: CatalogGPU) -> None:
    assert isinstance(gpu.total_bytes, int) and isinstance(gpu.usable_bytes, int)
    # The driver keeps a little for itself: PyTorch can use 97.5-100% of the total.
    assert 0 < gpu.usable_bytes < gpu.total_bytes
    assert gpu.reserved_bytes < 1200 * MiB and gpu.usable_bytes > 0.975 * gpu.total_bytes
    assert gpu.architecture in ARCHITECTURES
    assert 256 * MiB <= gpu.context_bytes <= 1 * GiB
    assert gpu.attention[-1] == "math"
    if gpu.vendor == "nvidia":
        assert gpu.bf16 == (gpu.compute_capability >= (8, 0))
        assert ("flash" in gpu.attention) == (gpu.compute_capability >= (8, 0))
        assert "mem_efficient" in gpu.attention  # every catalog GPU is sm50 or newer
        assert gpu.arch == f"sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}"
        assert gpu.nvml_names, "match_device needs the NVML name"
    # Its own spellings all lead back to it.
    for spelling in (gpu.name, *gpu.aliases, *gpu.nvml_names):
        assert lookup(spelling) is gpu, spelling


def test_no_strict_spelling_belongs_to_two_entries() -> None:
    assert {key: hits for key, hits in INDEX[0].items() if len(hits) > 1} == {}


def test_facts_checked_by_hand() -> None:
    a100 = lookup("A100-80GB")
    assert (a100.total_bytes, a100.compute_capability, a100.architecture) == (81920 * MiB, (8, 0), "ampere")
    assert lookup("H100-80GB").total_bytes == 81559 * MiB
    assert lookup("H200").total_bytes == 143771 * MiB and lookup("H200").usable_bytes > 139 * GiB
    assert lookup("V100-16GB").usable_bytes == 16160 * MiB
    assert lookup("T4").bf16 is False and lookup("T4").attention == ("mem_efficient", "math")
    assert lookup("B200").compute_capability == (10, 0) and lookup("B200").architecture == "blackwell"
    assert lookup("L40S").architecture == "ada" and lookup("RTX-4090").compute_capability == (8, 9)
    assert lookup("MI300X").arch == "gfx942" and lookup("MI250X").arch == "gfx90a"
    assert lookup("MI300X").bf16 and lookup("MI300X").nvml is False
    # Lazy loading makes today's context a fraction of the eager one measured on a V100 with CUDA 11.2.
    assert EAGER_CONTEXT_BYTES_V100 == 1343 * MiB
    assert lookup("V100-16GB").context_bytes < EAGER_CONTEXT_BYTES_V100 / 2


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("a100-80gb", "A100-80GB"),
        ("A100 80GB", "A100-80GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("a100_80g", "A100-80GB"),
        ("A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("h100", "H100-80GB"),
        ("H100 SXM5", "H100-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("h100-nvl", "H100-NVL"),
        ("NVIDIA H200", "H200"),
        ("H200 141GB", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("b200", "B200"),
        ("Tesla V100-SXM2-16GB", "V100-16GB"),
        ("V100 32GB PCIe", "V100-32GB"),
        ("tesla t4", "T4"),
        ("NVIDIA A10G", "A10G"),
        ("nvidia l4", "L4"),
        ("L40S", "L40S"),
        ("NVIDIA GeForce RTX 3090", "RTX-3090"),
        ("GeForce RTX 4090", "RTX-4090"),
        ("rtx4090", "RTX-4090"),
        ("RTX A6000", "RTX-A6000"),
        ("AMD Instinct MI300X", "MI300X"),
        ("mi250x", "MI250X"),
    ],
)
def test_forgiving_names(name: str, canonical: str) -> None:
    assert lookup(name).name == canonical


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown GPU 'h300'\. Did you mean .*'H200'.*Valid: A100-40GB"):
        lookup("h300")


def test_a_size_less_name_asks_which_size() -> None:
    with pytest.raises(InvalidArgumentError, match=r"GPU name 'a100' is ambiguous: it fits A100-40GB, A100-80GB\."):
        lookup("a100")
    with pytest.raises(InvalidArgumentError, match=r"GPU name 'Tesla V100' is ambiguous: it fits V100-16GB, V100-32GB"):
        lookup("Tesla V100")


def test_a_mistyped_alias_still_gets_a_suggestion() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown GPU 'nvidia a100 sxm4 80gbb'\. Did you mean 'A100-80GB'"):
        lookup("nvidia a100 sxm4 80gbb")


@pytest.mark.parametrize("name", ["", "   ", None, 80])
def test_a_name_must_be_a_string(name: object) -> None:
    with pytest.raises(InvalidArgumentError, match="a GPU name must be a non-empty string"):
        lookup(name)  # type: ignore[arg-type]


def _info(name: str, total: int = 0) -> GPUInfo:
    return GPUInfo(index=0, nvml_index=0, name=name, uuid="GPU-0", total_bytes=total)


@pytest.mark.parametrize(
    ("nvml_name", "canonical"),
    [("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA H100 80GB HBM3", "H100-80GB"), ("Tesla T4", "T4"),
     ("NVIDIA H100 NVL", "H100-NVL"), ("Tesla V100-SXM2-32GB", "V100-32GB"), ("NVIDIA B200", "B200")],
)
def test_match_device_by_nvml_name(nvml_name: str, canonical: str) -> None:
    match = match_device(_info(nvml_name))
    assert match is not None and match.name == canonical


def test_match_device_settles_a_bare_name_by_memory() -> None:
    assert match_device(_info("NVIDIA A100", 40960 * MiB)).name == "A100-40GB"  # type: ignore[union-attr]
    assert match_device(_info("Tesla V100", 32768 * MiB)).name == "V100-32GB"  # type: ignore[union-attr]


def test_match_device_returns_none_for_models_the_catalog_lacks() -> None:
    assert match_device(_info("NVIDIA GeForce GTX 1080 Ti")) is None
    assert match_device(_info("NVIDIA A100", 24 * GiB)) is None  # no A100 has 24 GiB: rather none than wrong
    assert match_device(_info("")) is None
