"""Noise schedules: the beta table and everything derived from it, in float64 on the CPU.

Index convention (as in diffusers and Ho et al.'s code): timestep index ``t`` runs over 0..T-1, and
``t = 0`` is the paper's t = 1. ``alphas_cumprod[t]`` is the paper's alpha-bar at t + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["NoiseSchedule", "DeviceTables"]


@dataclass(frozen=True)
class DeviceTables:
    """float32 copies of the per-timestep tables on one device, made once (see NoiseSchedule.on).

    Each attribute has shape (T,) and dtype float32. Index them with int64 timestep tensors on the same
    device: that never syncs, unlike indexing a CPU table with a device tensor.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A DDPM noise schedule: ``betas`` (T,) float64 on the CPU and the tables derived from it.

    Build one with :meth:`linear`, :meth:`cosine` or :meth:`from_betas`. All tables are float64 CPU
    tensors of shape (T,):

    - ``betas``: beta_t; ``alphas``: 1 - beta_t; ``alphas_cumprod``: prod_{s<=t} alpha_s (alpha-bar);
    - ``alphas_cumprod_prev``: alpha-bar at t-1, with 1.0 at t = 0;
    - ``posterior_variance``: beta_t (1 - ab_{t-1}) / (1 - ab_t), the variance of q(x_{t-1} | x_t, x0)
      ("fixed_small"); 0 at t = 0.
    """

    betas: torch.Tensor
    name: str = "custom"
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = self.betas
        if not isinstance(betas, torch.Tensor):
            betas = torch.as_tensor(betas)
        if betas.ndim != 1:
            raise ValueError(f"betas must be a 1-D table of length T, got shape {tuple(betas.shape)}")
        if betas.numel() < 1:
            raise ValueError("num_timesteps (T) must be >= 1, got an empty beta table")
        betas = betas.detach().to(device="cpu", dtype=torch.float64).contiguous()
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            bad = betas[~((betas > 0) & (betas < 1))]
            raise ValueError(
                f"every beta must lie in the open interval (0, 1); got {bad[:3].tolist()} "
                "(check beta_start / beta_end)"
            )
        object.__setattr__(self, "betas", betas)

    # ----------------------------------------------------------------------------------------------
    # constructors

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Ho et al.'s linear schedule: ``betas = linspace(beta_start, beta_end, T)`` in float64.

        diffusers builds the same table in float32; the difference is below 1e-9 per entry.
        """
        _check_num_timesteps(num_timesteps)
        for label, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (0.0 < float(value) < 1.0):
                raise ValueError(f"{label} must lie in (0, 1), got {value}")
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return cls(betas, name="linear")

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """improved-diffusion's cosine schedule (diffusers' ``squaredcos_cap_v2``).

        ab(u) = cos^2((u + s) / (1 + s) * pi / 2) and beta_i = min(1 - ab((i+1)/T) / ab(i/T), max_beta).
        """
        _check_num_timesteps(num_timesteps)
        if not (0.0 < max_beta < 1.0):
            raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")

        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ]
        return cls(torch.tensor(betas, dtype=torch.float64), name="cosine")

    @classmethod
    def from_betas(cls, betas, name: str = "custom") -> "NoiseSchedule":
        """A schedule from any beta table (sequence or tensor of length T, each in (0, 1))."""
        return cls(torch.as_tensor(betas, dtype=torch.float64), name=name)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Rebuild a schedule from :meth:`to_config`'s dict (as stored in run folders)."""
        kind = config.get("name", "linear")
        if kind == "linear":
            return cls.linear(config["num_timesteps"], config["beta_start"], config["beta_end"])
        if kind == "cosine":
            return cls.cosine(config["num_timesteps"])
        if kind == "custom" and "betas" in config:
            return cls.from_betas(config["betas"])
        raise ValueError(f"unknown schedule name {kind!r}: use 'linear', 'cosine' or 'custom' with betas")

    def to_config(self) -> dict:
        """A JSON-able description from which :meth:`from_config` rebuilds this schedule."""
        if self.name == "linear":
            return {
                "name": "linear",
                "num_timesteps": self.num_timesteps,
                "beta_start": float(self.betas[0]),
                "beta_end": float(self.betas[-1]) if self.num_timesteps > 1 else float(self.betas[0]),
            }
        if self.name == "cosine":
            return {"name": "cosine", "num_timesteps": self.num_timesteps}
        return {"name": "custom", "num_timesteps": self.num_timesteps, "betas": self.betas.tolist()}

    # ----------------------------------------------------------------------------------------------
    # derived tables (float64, CPU)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def sqrt_alphas_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> torch.Tensor:
        return (1.0 - self.alphas_cumprod).sqrt()

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio ab_t / (1 - ab_t) of x_t, (T,) float64."""
        ab = self.alphas_cumprod
        return ab / (1.0 - ab)

    def min_snr_weights(self, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights of an eps-prediction loss (Hang et al. 2023): min(SNR_t, gamma) / SNR_t,
        (T,) float64 in (0, 1]: 1 where the noise dominates (SNR <= gamma), gamma / SNR_t on the clean end."""
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"the min-SNR gamma must be a positive number (5 in Hang et al.), got {gamma!r}")
        snr = self.snr
        return snr.clamp(max=gamma) / snr

    @property
    def posterior_variance(self) -> torch.Tensor:
        ab = self.alphas_cumprod
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - ab)

    def respaced(self, timesteps) -> "NoiseSchedule":
        """The schedule seen by a sampler that visits only ``timesteps`` (any order, distinct, in 0..T-1).

        Entry k of the result belongs to the k-th smallest listed timestep u_k, with
        beta'_k = 1 - ab[u_k] / ab[u_{k-1}] (ab[u_{-1}] = 1), so its alpha-bar equals ab[u_k]
        (improved-diffusion's respacing; diffusers' step does the same through its ``prev_t``).
        """
        steps = sorted(int(t) for t in timesteps)
        ab = self.alphas_cumprod[steps]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return NoiseSchedule(1.0 - ab / ab_prev, name="respaced")

    # ----------------------------------------------------------------------------------------------

    def on(self, device: torch.device | str) -> DeviceTables:
        """float32 copies of the tables the fast paths index, made once per device and cached.

        Schedule math stays in float64 here; the copies are rounded to float32 once (never fp16: that
        rounds alpha-bar to 1 at small t).
        """
        device = torch.device(device)
        key = str(device)
        tables = self._device_cache.get(key)
        if tables is None:
            def put(x: torch.Tensor) -> torch.Tensor:
                return x.to(device=device, dtype=torch.float32)

            tables = DeviceTables(
                betas=put(self.betas),
                alphas_cumprod=put(self.alphas_cumprod),
                sqrt_alphas_cumprod=put(self.sqrt_alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=put(self.sqrt_one_minus_alphas_cumprod),
            )
            self._device_cache[key] = tables
        return tables

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_timesteps={self.num_timesteps})"


def _check_num_timesteps(num_timesteps) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps (T) must be an int >= 1, got {num_timesteps!r}")
