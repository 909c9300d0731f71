"""Counted floating-point work of a U-Net forward (and training step), for MFU.

Counts come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) on the meta
device: shapes flow through the model with no memory and no arithmetic, so counting the 35.7M-parameter
CIFAR-10 U-Net takes about a tenth of a second. Only matrix work is counted (convolutions, linears and the
attention matmuls); GroupNorm, SiLU and elementwise ops are left out, which is how MFU is usually stated.

For the CIFAR-10 U-Net (Ho et al.; diffusers ``google/ddpm-cifar10-32``) a forward costs 12.1 GFLOP per
image in convolutions and linears and about 12.4 GFLOP with the attention matmuls; a training step
(forward + backward) costs about three forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

# Ops FlopCounterMode can report, sorted into what MFU discussions call them.
_ATTENTION_OPS = ("bmm", "baddbmm", "attention")  # substring match: also catches the fused SDPA ops
_CONV_LINEAR_OPS = ("convolution", "convolution_backward", "mm", "addmm", "matmul")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one counted call, split by kind. ``by_op`` maps aten op names to FLOPs."""

    conv_linear: int
    attention: int
    other: int
    by_op: dict

    @property
    def total(self) -> int:
        return self.conv_linear + self.attention + self.other


def _classify(op_name: str) -> str:
    short = op_name.split(".")[-1] if op_name.startswith("aten.") else op_name
    short = short.split(".")[0]
    if any(key in short for key in _ATTENTION_OPS):
        return "attention"
    if short in _CONV_LINEAR_OPS:
        return "conv_linear"
    return "other"


def _math_attention():
    """Route SDPA through its math decomposition so its matmuls show up as countable bmm ops.

    The fused CPU flash kernel has no FLOP formula in FlopCounterMode and would silently count as zero.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3; the package needs >= 2.4

    return sdpa_kernel(SDPBackend.MATH)


def count_flops(fn, *args, **kwargs) -> FlopCount:
    """Run ``fn(*args, **kwargs)`` under FlopCounterMode and return the FLOPs it performed, by kind."""
    counter = FlopCounterMode(display=False)
    with _math_attention(), counter:
        fn(*args, **kwargs)
    totals = {"conv_linear": 0, "attention": 0, "other": 0}
    by_op = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = str(op)
        by_op[name] = by_op.get(name, 0) + int(flops)
        totals[_classify(name)] += int(flops)
    return FlopCount(by_op=by_op, **totals)


def _build_unet(config, device: str):
    from ddpm_fast.unet import UNet

    with torch.device(device):
        model = UNet(config)
    return model.eval()


def _count_unet(config, backward: bool) -> FlopCount:
    """Count one forward (and backward) at batch 1, on meta; on a plain CPU batch if meta cannot run it."""
    for device in ("meta", "cpu"):
        try:
            model = _build_unet(config, device)
            x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, device=device)
            t = torch.full((1,), 10, dtype=torch.int64, device=device)
            if backward:
                model.train()

                def step():
                    model(x, t).float().square().mean().backward()

                return count_flops(step)
            with torch.no_grad():
                return count_flops(model, x, t)
        except (NotImplementedError, RuntimeError):
            # Some op without a meta kernel: the CPU at batch 1 costs ~1 s but always works.
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def unet_forward_flops(config, include_attention: bool = True) -> int:
    """FLOPs of one U-Net forward for ONE image (batch 1), counted on the meta device.

    config: a ``ddpm_fast.unet.UNetConfig``. include_attention: add the attention matmuls (q k^T and
    attn v) to the convolutions and linears. Cost scales linearly with batch size.
    Returns an int (CIFAR-10 U-Net: about 12.1e9 without attention matmuls, 12.4e9 with).
    """
    count = _count_unet(config, backward=False)
    return count.conv_linear + (count.attention if include_attention else 0)


def unet_training_flops(config, include_attention: bool = True) -> int:
    """FLOPs of one training step's forward + backward for ONE image (about 3x the forward)."""
    count = _count_unet(config, backward=True)
    return count.conv_linear + (count.attention if include_attention else 0)


def unet_flop_breakdown(config, backward: bool = False) -> FlopCount:
    """The full :class:`FlopCount` of one forward (or forward + backward) for one image, by op."""
    return _count_unet(config, backward=backward)
