"""The CUDA device model's kernel swaps: a trace for a CUDA target runs what CUDA would run, a trace for the
CPU target what the CPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import memguard
from memguard.device.cuda_kernels import _CudaKernels
from memguard.device.models import CUDADevice
from memguard.trace import StepProgram, trace_training

# ---------------------------------------------------------------------------------------------------------
# CUDA autocast's op lists

CALLS = {
    "softmax": "x.softmax(-1)", "F.softmax": "F.softmax(x, -1)", "log_softmax": "torch.log_softmax(x, -1)",
    "softmax to float32": "F.softmax(x, -1, dtype=torch.float32)", "softmax given dtype": "x.softmax(-1, x.dtype)",
    "layer_norm": "F.layer_norm(x, (8,), w32, w32)", "group_norm": "F.group_norm(img, 2)",
    "rms_norm": "F.rms_norm(x, (8,), w32)", "sum": "x.sum()", "sum(dim)": "torch.sum(x, -1)",
    "sum(int)": "tgt.sum()", "cumsum": "x.cumsum(-1)", "prod": "x.prod()", "mean": "x.mean()", "exp": "x.exp()",
    "torch.exp": "torch.exp(x)", "pow": "x.pow(2)", "x ** 2": "x ** 2", "2 ** x": "2 ** x", "rsqrt": "torch.rsqrt(x)",
    "1 / x": "1 / x", "softplus": "F.softplus(x)", "normalize": "F.normalize(x, dim=-1)", "norm": "x.norm()",
    "logsumexp": "x.logsumexp(-1)", "cosine_similarity": "F.cosine_similarity(x, t)", "dist": "x.dist(t)",
    "interpolate": "F.interpolate(img, scale_factor=2)",
    "interpolate bilinear": "F.interpolate(img, scale_factor=2, mode='bilinear')",
    "interpolate area": "F.interpolate(img, size=(3, 3), mode='area')",
    "reflection pad": "F.pad(img, (1, 1, 1, 1), mode='reflect')",
    "replication pad": "F.pad(img, (1, 1, 1, 1), mode='replicate')", "max_pool3d": "F.max_pool3d(vol, 2)",
    "avg_pool3d": "F.avg_pool3d(vol, 2)", "adaptive_avg_pool3d": "F.adaptive_avg_pool3d(vol, 2)",
    "cross_entropy": "F.cross_entropy(x, tgt)", "cross_entropy soft": "F.cross_entropy(x, probs)",
    "cross_entropy smoothed": "F.cross_entropy(x, tgt, label_smoothing=0.1)", "mse_loss": "F.mse_loss(x, t)",
    "nll_loss": "F.nll_loss(x, tgt)", "linear": "F.linear(probs, probs)", "gelu": "F.gelu(x)",
}

# torch's own CUDA autocast wrappers are registered in the CPU build too; fake tensors that claim a CUDA device
# reach them, so the ops CUDA autocast dispatches can be listed without a GPU. Anything that needs a CUDA
# device guard (autograd on those tensors) aborts the process, hence the subprocess and no gradients.
_CUDA_AUTOCAST_OPS = r"""
import json, sys
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append([str(func)] + [str(o.dtype) for o in outs if isinstance(o, torch.Tensor)])
        return out

calls = json.loads(sys.argv[1])
mode = FakeTensorMode()
results = {}
for name in sys.argv[2:]:
    dtype = getattr(torch, name)
    def make(*shape, dt=dtype):
        return FakeTensor(mode, torch.empty(*shape, dtype=dt, device="meta"), torch.device("cuda"))
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    with mode:
        env = dict(torch=torch, F=F, x=make(4, 8), t=make(4, 8), img=make(2, 4, 6, 6), vol=make(1, 2, 4, 4, 4),
                   tgt=make(4, dt=torch.long), probs=make(4, 8, dt=torch.float32), w32=make(8, dt=torch.float32))
        for call, code in calls.items():
            rec = Ops()
            with rec:
                out = eval(code, env)
            results[f"{name} {call}"] = [str(out.dtype), rec.ops]
    torch.set_autocast_enabled("cuda", False)
print(json.dumps(results))
"""


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[list[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append([str(func)] + [str(o.dtype) for o in outs if isinstance(o, torch.Tensor)])
        return out


def _emulated_ops(dtype: torch.dtype) -> dict[str, list]:
    """The same calls on the fake CPU tensors memguard traces, CPU autocast on, CUDA kernels swapped in."""
    results = {}
    with FakeTensorMode(), _CudaKernels(), torch.autocast("cpu", dtype=dtype):
        def make(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dt)

        env = dict(torch=torch, F=F, x=make(4, 8), t=make(4, 8), img=make(2, 4, 6, 6), vol=make(1, 2, 4, 4, 4),
                   tgt=make(4, dt=torch.long), probs=make(4, 8, dt=torch.float32), w32=make(8, dt=torch.float32))
        for call, code in CALLS.items():
            rec = _Ops()
            with rec:
                out = eval(code, env)  # noqa: S307 - fixed expressions from CALLS
            results[f"{str(dtype).split('.')[1]} {call}"] = [str(out.dtype), rec.ops]
    return results


def _allocating(ops: list[list[str]]) -> list[list[str]]:
    """Operators with their output dtypes, without device queries; ``div.Scalar`` and ``div.Tensor`` of a
    Python number allocate alike, so overloads are dropped."""
    return [[op[0].rsplit(".", 1)[0], *op[1:]] for op in ops if op[0] != "prim.device.default"]


@pytest.fixture(scope="module")
def cuda_autocast_ops() -> dict[str, list]:
    command = [sys.executable, "-c", _CUDA_AUTOCAST_OPS, json.dumps(CALLS), "float16", "bfloat16"]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"fake CUDA tensors unavailable in this torch build: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_traced_ops_match_what_cuda_autocast_dispatches(cuda_autocast_ops: dict[str, list], dtype: torch.dtype) -> None:
    emulated = _emulated_ops(dtype)
    for key, (out_dtype, ops) in emulated.items():
        want_dtype, want_ops = cuda_autocast_ops[key]
        assert out_dtype == want_dtype, key
        assert _allocating(ops) == _allocating(want_ops), key


def test_cpu_autocast_alone_differs_from_cuda_where_it_matters(cuda_autocast_ops: dict[str, list]) -> None:
    """Without the swap the trace would keep softmax / layer_norm in half precision (what these tests
    guard against), and would upcast reflection padding that CUDA leaves alone."""
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.float16):
        x = torch.empty(4, 8, dtype=torch.float16)
        img = torch.empty(2, 4, 6, 6, dtype=torch.float16)
        cpu = {"softmax": x.softmax(-1).dtype, "layer_norm": F.layer_norm(x, (8,)).dtype,
               "reflection pad": F.pad(img, (1, 1, 1, 1), mode="reflect").dtype}
    for call, dtype in cpu.items():
        assert str(dtype) != cuda_autocast_ops[f"float16 {call}"][0], call


class Block(nn.Module):
    """Self-attention (scores through softmax) and a LayerNorm on the float16 attention output."""

    seen: ClassVar[list[tuple[torch.dtype, torch.dtype]]] = []  # on the class: memguard traces a copy

    def __init__(self, d: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        probs = F.softmax(q @ k.transpose(-1, -2), dim=-1)
        normed = self.norm((probs @ v).transpose(1, 2).reshape(b, l, d))
        Block.seen.append((probs.dtype, normed.dtype))
        return normed


def _dtypes_seen(device: str | CUDADevice, precision: str, **kwargs: object) -> list[tuple[torch.dtype, torch.dtype]]:
    Block.seen.clear()
    memguard.estimate(nn.Sequential(Block(), Block()), torch.randn(2, 16, 64), device=device, precision=precision,
                      optimizer="sgd", steps=1, **kwargs)
    return list(Block.seen)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_cuda_target_runs_softmax_and_layer_norm_in_float32(precision: str) -> None:
    assert _dtypes_seen("cuda", precision) == [(torch.float32, torch.float32)] * 2


def test_cpu_target_keeps_cpu_autocast_dtypes() -> None:
    assert _dtypes_seen("cpu", "16-mixed") == [(torch.float16, torch.float16)] * 2
    assert _dtypes_seen(CUDADevice(autocast_lists=False), "16-mixed") == [(torch.float16, torch.float16)] * 2


def test_checkpoint_recomputation_takes_the_cuda_path() -> None:
    # each block runs twice: forward, then its recomputation in backward (run to the end, past the last saved
    # tensor, so the block records what it saw); non-reentrant checkpointing would also raise if the
    # recomputed tensors' dtypes differed from the first run's
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        seen = _dtypes_seen("cuda", "16-mixed", gradient_checkpointing=True)
    assert seen == [(torch.float32, torch.float32)] * 4


class Attention(nn.Module):
    def __init__(self, d: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        probs = F.softmax(scores, dim=-1)
        return (probs @ v).float().sum()


def test_float32_softmax_costs_four_bytes_per_probability_by_hand() -> None:
    b, heads, l = 2, 2, 64
    x = torch.randn(b, l, 64)
    cuda = memguard.estimate(Attention(), x, device=CUDADevice(), precision="16-mixed", optimizer="sgd", steps=1)
    cpu_lists = memguard.estimate(Attention(), x, device=CUDADevice(autocast_lists=False), precision="16-mixed",
                                  optimizer="sgd", steps=1)
    # The forward's locals keep every tensor to its end, where it peaks. With CPU autocast's lists one float16
    # probability tensor is saved for softmax's and the second matmul's backward (2 bytes each); on CUDA
    # softmax saves its float32 output (4) and the matmul the float16 copy autocast casts for it (2).
    probabilities = b * heads * l * l
    assert cuda.phase_peaks["step1.forward"] - cpu_lists.phase_peaks["step1.forward"] == 4 * probabilities


def test_swapped_functions_are_restored_and_other_threads_see_the_originals() -> None:
    originals = (torch.exp, torch.softmax, F.layer_norm, F.dropout, F.cross_entropy, torch.Tensor.__pow__)
    other_thread: list[torch.dtype] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def run() -> None:
                with torch.autocast("cpu", dtype=torch.float16):
                    other_thread.append(torch.ones(2, 2, dtype=torch.float16).softmax(-1).dtype)

            worker = threading.Thread(target=run)
            worker.start()
            worker.join()
            return self.lin(x).softmax(-1).float().sum()

    memguard.estimate(Probe(), torch.randn(2, 8), device="cuda", precision="16-mixed", optimizer="sgd", steps=1)
    assert other_thread == [torch.float16]
    assert (torch.exp, torch.softmax, F.layer_norm, F.dropout, F.cross_entropy, torch.Tensor.__pow__) == originals
    assert "softmax" not in vars(torch.Tensor) and torch.Tensor.softmax is torch._C.TensorBase.softmax


def test_attention_inputs_are_cast_as_autocast_casts_them() -> None:
    """scaled_dot_product_attention is on both autocast lists; CUDA's kernel stand-in must cast as well."""
    dtypes: list[torch.dtype] = []

    class Sdpa(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x * self.w  # float32: the elementwise product is on no autocast list
            out = F.scaled_dot_product_attention(q, q, q)
            dtypes.append(out.dtype)
            return out.float().sum()

    x = torch.randn(2, 2, 8, 16)
    memguard.estimate(Sdpa(), x, device="cpu", precision="16-mixed", optimizer="sgd", steps=1)
    memguard.estimate(Sdpa(), x, device="cuda", precision="16-mixed", optimizer="sgd", steps=1)
    assert dtypes == [torch.float16, torch.float16]


# ---------------------------------------------------------------------------------------------------------
# A trainable attention mask


class BiasedAttention(nn.Module):
    """T5-style: a learned additive position bias per head, passed to SDPA as a float mask."""

    grads: ClassVar[list[tuple[tuple[int, ...], torch.dtype]]] = []

    def __init__(self, d: int = 64, heads: int = 4, length: int = 36) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.bias = nn.Parameter(torch.zeros(1, heads, length, length))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        self.bias.register_hook(lambda g: BiasedAttention.grads.append((tuple(g.shape), g.dtype)))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias).float().sum()


@pytest.mark.parametrize("attention", ["flash", "efficient", "math"])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_trainable_attention_mask_gets_its_gradient(attention: str, precision: str) -> None:
    BiasedAttention.grads.clear()
    memguard.estimate(BiasedAttention(), torch.randn(2, 36, 64), device=CUDADevice(attention=attention),
                      precision=precision, optimizer="sgd", steps=1)
    assert BiasedAttention.grads == [((1, 4, 36, 36), torch.float32)]


def test_trainable_mask_takes_the_memory_efficient_kernel() -> None:
    """Flash attention takes no mask; the memory-efficient kernel does and returns its gradient. torch pads a
    mask whose row stride is not a multiple of 8 (36 -> 40, a copy kept for backward) and the kernel's
    backward writes a full (batch, heads, L, S) gradient with S aligned to 16 (36 -> 48)."""
    trace = trace_training(BiasedAttention(), torch.randn(2, 36, 64), None, StepProgram(steps=1),
                           device=CUDADevice(attention="flash").fresh())
    padded = 1 * 4 * 36 * 40 * 4
    full_gradient = 2 * 4 * 36 * 48 * 4
    assert padded in trace.sizes
    assert full_gradient in trace.sizes


def test_gemm_copies_an_operand_blas_cannot_read() -> None:
    """A gradient broadcast from a scalar (the sum of a Linear's output) has strides (0, 0): the matrix
    product clones it first. Row- and column-major operands are read as they are."""
    from memguard.device.models import gemm_copy_bytes

    mm, addmm = torch.ops.aten.mm.default, torch.ops.aten.addmm.default
    a, b = torch.ones(64, 32), torch.ones(32, 16)
    assert gemm_copy_bytes(mm, (a, b)) == 0
    assert gemm_copy_bytes(mm, (b.t(), a.t())) == 0  # column-major views
    broadcast = torch.ones(()).expand(64, 32)
    assert gemm_copy_bytes(mm, (broadcast, b)) == 64 * 32 * 4
    assert gemm_copy_bytes(addmm, (torch.ones(16), broadcast, b)) == 64 * 32 * 4  # the bias is not a matrix
    assert gemm_copy_bytes(torch.ops.aten.add.Tensor, (broadcast, broadcast)) == 0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_sum_of_a_linear_output_against_the_real_peak(optimizer: str) -> None:
    """The default loss sums the model's output: backward multiplies the broadcast gradient, which the CPU
    kernel copies contiguous (on SGD that copy sits at the peak)."""
    from groundtruth import REAL_OPTIMIZERS, measure_peak

    torch.manual_seed(0)
    model, batch = nn.Linear(256, 256), torch.randn(64, 256)
    real = measure_peak(model, batch, REAL_OPTIMIZERS[optimizer])
    est = memguard.estimate(model, batch, optimizer=optimizer, device="cpu").peak_bytes
    assert abs(est - real) / real <= 0.02, f"predicted {est:,} vs measured {real:,}"
