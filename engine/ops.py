"""The engine's compute ops, on every device: hand-written C++ kernels on CPU in fp32, PyTorch elsewhere.

The kernels live in `csrc/` (built once with the system C++ compiler by `torch.utils.cpp_extension` and cached):
- `linear(x, weight_t, bias)`: y = x @ W.T + b, W row-major [out, in] (weight_t its transpose). Register blocks
  of weight rows x input rows of dot products, weight rows split across threads with ATen's OpenMP pool.
- `rms_norm`, `silu_mul`, `rope_`: one pass each where ATen takes several small ops.
- `decode_attention`: a few query rows per sequence with GQA over the paged KV cache (read in place through block
  tables, fp32 or FP8/NVFP4 codes decoded as it walks them), each row bounded by its own position (and sliding
  window), so batched decode and speculative verify need no mask; or draft-tree rows with per-row ancestor masks.
- `kv_store`: K and V rows copied into unquantized pools (one call where index_copy_ takes two dispatches each).
- `kv_write`: K or V encoded straight into FP8/NVFP4 pools (centring, rotation and block-scale search included).
Every output row is computed alone, in the same order whatever the number of rows, so a speculative verify is
bit-identical to decode steps.

Each op has one fallback rule: the kernel when it is built, autograd does not need the op (the kernels have no
backward: QAT, distillation and draft heads train through the references) and the tensors are fp32 on the CPU
in the layout it reads; else its PyTorch reference below. Nothing is built when `OPTISERVE_CPU_KERNELS=0`, and
a failed build (no compiler) leaves every op on its reference.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .tree_attention import TreeMask

if TYPE_CHECKING:
    from .kv_quant import KVEncoding, KVPages

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ["linear.cpp", "rowwise.cpp", "attention.cpp", "kv_write.cpp", "bindings.cpp"]
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_flags_line() -> str:
    """/proc/cpuinfo's ISA flags line ("flags" on x86, "Features" on Arm), "" where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def cpu_flags() -> set[str]:
    return set(cpu_flags_line().partition(":")[2].split())


def _cpu_id() -> str:
    """The machine and its ISA flags: a build for one CPU must not be loaded on another."""
    return platform.machine() + cpu_flags_line()


def build_name(cflags: list[str]) -> str:
    """Extension name keyed by the sources, flags, this CPU and torch, so a cache dir shared across machines
    stays safe."""
    sources = [p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    digest = hashlib.sha256("\0".join([*sources, *cflags, _cpu_id(), torch.__version__]).encode()).hexdigest()[:12]
    return f"optiserve_cpu_{digest}"


def extension_dir(name: str) -> Path:
    """Where torch builds and caches extension `name` (under $TORCH_EXTENSIONS_DIR when set)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name


def compile_extension(name: str, sources: list[str], cflags: list[str]) -> ModuleType:
    """torch's JIT build of `sources` from csrc/ (or its cached build), under an OS file lock.

    torch guards a build with a `lock` file that only the builder removes: a process killed mid-build leaves it, and
    every later start waits on it forever. The kernel releases our `flock` when its holder dies, so whoever holds it
    knows any `lock` left in the build directory is stale and removes it."""
    from torch.utils.cpp_extension import load as load_extension

    build_dir = extension_dir(name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.with_suffix(".flock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released on close, or by the kernel if this process dies
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was killed", stale)
            stale.unlink()
        return load_extension(name, [str(CSRC / s) for s in sources], extra_cflags=cflags,
                              build_directory=str(build_dir))


def build(cflags: list[str] = CFLAGS) -> ModuleType:
    """Compile (or load the cached build of) the kernels with `cflags`; raises when the build fails."""
    return compile_extension(build_name(cflags), SOURCES, cflags)


@functools.cache
def load() -> ModuleType | None:
    """The built kernels, or None if they are disabled or cannot be built here."""
    if os.environ.get("OPTISERVE_CPU_KERNELS", "1") == "0":
        return None
    try:
        log.info("loading CPU kernels (the first build takes ~30 s, later starts reuse it)")
        return build()
    except Exception as e:  # no compiler, unsupported flags...: run on plain PyTorch ops
        log.warning("CPU kernels unavailable, using PyTorch ops (slower decode): %s", str(e).splitlines()[0])
        return None


def _kernels(*tensors: torch.Tensor | None) -> ModuleType | None:
    """The kernels, unless none are built or autograd must see the op (`tensors` require grad)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    return load()


def _f32_cpu(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.is_cpu) for t in tensors)


# ---- PyTorch references: the fallbacks, and what the kernels must match ----
def linear_ref(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight_t
    return y if bias is None else y + bias


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_ref(x: torch.Tensor, freqs: torch.Tensor, n_heads: int) -> None:
    """In place: rotate interleaved pairs of heads [0, n_heads) of `x` [B, S, N, D] by `freqs` [B, S, D/2, 2]."""
    rot = torch.view_as_complex(x[:, :, :n_heads].float().unflatten(-1, (-1, 2)))
    x[:, :, :n_heads] = torch.view_as_real(rot * torch.view_as_complex(freqs).unsqueeze(2)).flatten(-2).to(x.dtype)


# ---- the ops ----
def is_transposed_row_major(weight_t: torch.Tensor) -> bool:
    """Whether `weight_t` [in, out] is the transpose of a row-major [out, in] (what the linear kernel reads)."""
    return weight_t.stride(0) == 1 and (weight_t.stride(1) == weight_t.shape[0] or weight_t.shape[1] == 1)


def linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight_t (+ bias); weight_t [in, out], fast when it is the transpose of a row-major [out, in]."""
    mod = _kernels(x, weight_t, bias)
    if (mod is not None and _f32_cpu(x, weight_t, bias) and is_transposed_row_major(weight_t)
            and (bias is None or bias.is_contiguous())):
        return mod.linear(x, weight_t, bias)
    return linear_ref(x, weight_t, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (HF's fp32 math)."""
    mod = _kernels(x, weight)
    if mod is not None and _f32_cpu(x, weight) and x.is_contiguous() and weight.is_contiguous():
        return mod.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `gate_up` [..., 2I] = [gate | up]."""
    mod = _kernels(gate_up)
    if mod is not None and _f32_cpu(gate_up) and gate_up.is_contiguous():
        return mod.silu_mul(gate_up)
    return silu_mul_ref(gate_up)


def rope_(x: torch.Tensor, freqs: torch.Tensor, n_heads: int) -> None:
    """In place: RoPE on heads [0, n_heads) of `x` [B, S, N, D] (interleaved pairs), `freqs` [B, S, D/2, 2]."""
    mod = _kernels(x)
    if mod is not None and _f32_cpu(x, freqs) and x.is_contiguous() and freqs.is_contiguous():
        mod.rope_(x, freqs, n_heads)
    else:
        rope_ref(x, freqs, n_heads)


def wants_row_major(weight: torch.Tensor) -> bool:
    """Whether a CPU weight is best stored row-major [out, in]: for the fp32 kernel, and for bf16, where ATen's GEMV
    reads that layout faster. Only fp32 without the kernel keeps [in, out] (MKL's GEMV reads it faster)."""
    return weight.device.type == "cpu" and (weight.dtype != torch.float32 or load() is not None)


def decode_attention_available(dtype: torch.dtype, device: torch.device) -> bool:
    """The rule for `decode_attention`: where it does not run, the model uses SDPA with a mask instead."""
    return dtype == torch.float32 and device.type == "cpu" and load() is not None


def decode_attention(
    qkv: torch.Tensor, k_pages: torch.Tensor | KVPages, v_pages: torch.Tensor | KVPages, block_table: torch.Tensor,
    positions: torch.Tensor, n_heads: int, window: int, tree: TreeMask | None = None,
) -> torch.Tensor:
    """Attention of a few query rows per sequence over the paged cache: `qkv` [B, S, N, D] (heads [0, n_heads) are
    q), the pools k/v_pages [num_blocks, block_size, KV, D] read in place through `block_table` [B, nb] (sequence
    b's positions [i*bs, (i+1)*bs) live in block block_table[b, i]), `positions` [B, S]; row (b, s) attends keys
    (positions[b, s] - window, positions[b, s]] (window 0: all up to it). Rows are computed independently, so a
    speculative verify over S rows is bit-identical to S one-token decode steps, whatever the block size. With a
    draft `tree`, row (b, s) attends the prefix and its ancestors instead (tree_attention.py), bit-identical to
    decode steps over its path. Packed pools (`KVPages`, FP8/NVFP4) are decoded as they are read; keys stored
    rotated (NVFP4) are scored against the query rotated alike, once per row and head. Returns [B, S, n_heads*D]."""
    base, ancestors = tree_operands(tree)
    if isinstance(k_pages, torch.Tensor):
        return load().decode_attention(qkv, k_pages, v_pages, block_table, positions, n_heads, window,  # type: ignore
                                       base, ancestors)
    k, v = k_pages.encoding, v_pages.encoding
    q = qkv if k.rotation is None else qkv[:, :, :n_heads] @ k.rotation  # [B, S, H, D]: (H q).(H k) = q.k
    return load().decode_attention_packed(  # type: ignore
        q, k_pages.codes, _or_empty(k_pages.scales), v_pages.codes, _or_empty(v_pages.scales), k.format.kernel_code,
        k.scale_value, v.scale_value, block_table, positions, n_heads, window, base, ancestors)


def tree_operands(tree: TreeMask | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A draft tree as the attention kernel takes it: (base [B], ancestors [B, S, T]), both empty for no tree."""
    return (tree.base, tree.ancestors) if tree is not None else (_EMPTY, _EMPTY)


def kv_store(k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    """Copy `k`/`v` [B, S, KV, D] into token rows `rows` [B * S] of a layer's unquantized pools [..., KV, D]
    (contiguous: a row is KV * D values)."""
    mod = _kernels(k, v)
    if (mod is not None and _f32_cpu(k, v, k_pool, v_pool) and k.stride(-1) == v.stride(-1) == 1
            and k.stride(-2) == v.stride(-2) == k.shape[-1]):
        mod.kv_store(k, v, rows, k_pool, v_pool)  # checks the rest
        return
    for pool, t in ((k_pool, k), (v_pool, v)):
        pool.view(-1, t.shape[-2] * t.shape[-1]).index_copy_(0, rows, t.reshape(rows.numel(), -1).to(pool.dtype))


def kv_write(enc: KVEncoding, x: torch.Tensor, rows: torch.Tensor, codes: torch.Tensor,
             scales: torch.Tensor | None) -> None:
    """Encode K or V `x` [B, S, KV, D] into token rows `rows` [B * S] of a layer's pools `codes` [T, KV, W] (and the
    block scales [T, KV, D/16]) as `enc` says: the kernel where the ops' rule allows, else `enc.encode`."""
    mod = _kernels(x)
    if mod is not None and _f32_cpu(x) and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] and codes.is_cpu:
        mod.kv_write(enc.format.kernel_code, x, rows, codes, _or_empty(scales), enc.scale_value,
                     _or_empty(enc.mean), _or_empty(enc.rotation), list(enc.factors))
        return
    new_codes, new_scales = enc.encode(x)  # [B, S, KV, W], [B, S, KV, D/16]
    codes.index_copy_(0, rows, new_codes.reshape(rows.numel(), *codes.shape[1:]))
    if scales is not None:
        scales.index_copy_(0, rows, new_scales.reshape(rows.numel(), *scales.shape[1:]))


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if t is None else t


_EMPTY = torch.empty(0, dtype=torch.long)
