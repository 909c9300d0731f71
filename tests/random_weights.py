"""Non-trivial weights for compatibility tests (imported by the test modules; pytest puts tests/ on the path).

A freshly initialised U-Net hides mistakes: GroupNorm affines are (1, 0) and some layers start at zero.
Comparisons against diffusers therefore run on weights drawn here.
"""

import torch


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values: GroupNorm affines around (1, 0) with spread 0.3, weights
    scaled by 1/sqrt(fan_in) so activations stay O(1) through the depth, biases spread 0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
