"""Shared pieces of the element-wise kernels: memory layouts, launch sizes and argument checks.

Every kernel walks one image per grid row (program_id(1) = image b) and BLOCK elements of it per
program, in the memory order of the tensor it writes. A (B, C, H, W) tensor is accepted in either dense
layout: NCHW-contiguous or channels_last (NHWC in memory). Noise is keyed by the *logical* NCHW index
e = c*H*W + h*W + w, so it does not depend on the layout.
"""

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BATCH = 65535  # CUDA's limit on grid dimension 1


def interpreting() -> bool:
    """True when these kernels run through Triton's CPU interpreter.

    Triton decides when a kernel is decorated (TRITON_INTERPRET=1 at import time of this package), so
    ask the decorated object rather than the environment, which may have changed since.
    """
    return type(layout_index).__name__ == "InterpretedFunction"


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, H, W) is laid out NHWC; tensors dense in both layouts count as NCHW."""
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def is_dense(x: torch.Tensor) -> bool:
    """Whether x (B, C, H, W) is NCHW-contiguous or channels_last: the layouts the kernels address."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when NCHW- or NHWC-dense, else an NCHW-contiguous copy (strided views, expands)."""
    return x if is_dense(x) else x.contiguous()


def require_dense(out: torch.Tensor, name: str) -> torch.Tensor:
    """An output the caller gave: it is written in place, so it cannot be copied into a dense layout."""
    if not is_dense(out):
        raise ValueError(f"{name} must be NCHW-contiguous or channels_last (it is written in place)")
    return out


def launch_config(per_image: int, batch: int):
    """(BLOCK, num_warps, grid) for a walk over ``batch`` images of ``per_image`` elements each.

    The grid depends on shapes alone, so a captured CUDA graph replays it unchanged. The interpreter
    pays per program, so it gets the largest blocks.
    """
    if batch > MAX_BATCH:
        raise ValueError(f"batch size {batch} exceeds the kernel limit of {MAX_BATCH} images: split the batch")
    if per_image >= 2**31:
        raise ValueError(f"{per_image} elements per image exceeds the kernels' int32 indexing: use smaller images")
    cap = 4096 if interpreting() else 1024
    block = max(128, min(cap, triton.next_power_of_2(per_image)))
    num_warps = 4 if block <= 1024 else 8
    return block, num_warps, (triton.cdiv(per_image, block), batch)


def check_image(x, name: str) -> None:
    """x must be a (B, C, H, W) tensor of a kernel I/O dtype (float32, bfloat16, float16)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; the kernels take float32, bfloat16 or float16 "
                        "(use the torch backend for other dtypes)")


def check_same_image(y, x: torch.Tensor, name: str, ref_name: str) -> None:
    """y must be a kernel I/O tensor with x's shape, on x's device."""
    check_image(y, name)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but {ref_name} is on {x.device}: move them to one device")


def check_index_tensor(v, name: str, lengths, device: torch.device) -> None:
    """v must be an int32/int64 tensor on ``device`` with a shape (n,) for n in ``lengths``."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor on {device}, got {type(v).__name__}")
    if v.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got dtype {v.dtype}")
    if v.ndim != 1 or v.shape[0] not in lengths:
        want = " or ".join(f"({n},)" for n in sorted(set(lengths)))
        raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the images are on {device}: move it to {device}")
    if not v.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_table(table, name: str, columns: int | None, device: torch.device) -> None:
    """table must be a float32 contiguous tensor on ``device``: (S, columns), or (T,) when columns is None."""
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor on {device}, got {type(table).__name__}")
    if table.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (coefficient tables are never half precision), got {table.dtype}")
    if columns is None and table.ndim != 1:
        raise ValueError(f"{name} must be a 1-D (T,) table, got shape {tuple(table.shape)}")
    if columns is not None and (table.ndim != 2 or table.shape[1] != columns):
        raise ValueError(f"{name} must have shape (S, {columns}), got {tuple(table.shape)}")
    if table.device != device:
        raise ValueError(f"{name} is on {table.device} but the images are on {device}: move it to {device}")
    if not table.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


NOISE_NONE, NOISE_GIVEN, NOISE_SEEDED = 0, 1, 2  # the NOISE constexpr of the update kernels


def noise_source(x: torch.Tensor, seeds, noise, name: str = "x"):
    """(NOISE mode, z pointer tensor) of an update kernel: ``noise`` given as a tensor like x, ``seeds``
    (int64 (B,) on x's device) for in-kernel noise, or neither (z = 0; x stands in as the unused pointer)."""
    if seeds is not None and noise is not None:
        raise ValueError("give at most one of seeds (in-kernel noise) or noise (a tensor)")
    if noise is not None:
        check_same_image(noise, x, "noise", name)
        return NOISE_GIVEN, dense(noise)
    if seeds is not None:
        check_index_tensor(seeds, "seeds", (x.shape[0],), x.device)
        return NOISE_SEEDED, x
    return NOISE_NONE, x


@triton.jit
def layout_index(p, C: tl.constexpr, HW, FROM_CL: tl.constexpr, TO_CL: tl.constexpr):
    """Map an in-image memory position p of layout FROM to the position of the same element in TO.

    Layouts: NCHW (position = logical index c*HW + hw) or channels-last (position = hw*C + c).
    """
    if FROM_CL == TO_CL:
        return p
    elif FROM_CL:
        return (p % C) * HW + p // C
    else:
        return (p % HW) * C + p // HW
