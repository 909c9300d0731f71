"""The DDPM U-Net (Ho et al. 2020) as diffusers' ``UNet2DModel`` computes it.

One config dataclass (:class:`UNetConfig`) and one module (:class:`UNet`). The module tree uses
diffusers' state-dict names (``conv_in``, ``time_embedding.linear_1``, ``down_blocks.0.resnets.0.norm1``,
``down_blocks.1.attentions.0.to_q``, ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_out``), so a
diffusers checkpoint loads with a plain ``load_state_dict`` (see :mod:`ddpm_fast.diffusers_io`).

The forward is free of host syncs and value-dependent Python branches (only shape checks), so it can be
``torch.compile``'d and captured in a CUDA graph; it runs in channels-last memory format and under bf16
autocast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_image_batch, timesteps_for_batch

__all__ = ["UNetConfig", "UNet", "timestep_embedding"]


def _as_int_tuple(value, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    items = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    return items


def _check_int(value, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines a U-Net of the DDPM family (the defaults are Ho et al.'s CIFAR-10 model).

    ``attention_levels`` lists the resolution levels (0 = full resolution, level i works at
    ``sample_size / 2**i``) whose down and up blocks carry self-attention; the middle block always has one.
    ``attention_head_dim=None`` means one head spanning all channels (Ho's model); an int d gives
    ``C // d`` heads of d channels. ``flip_sin_to_cos`` / ``freq_shift`` select the sinusoid variant
    (False / 1 is Ho's ``get_timestep_embedding``).
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attention_levels: tuple[int, ...] = (1,)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.1
    flip_sin_to_cos: bool = False
    freq_shift: float = 1
    attention_head_dim: int | None = None

    def __post_init__(self):
        # Lists (from JSON) become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "block_out_channels", _as_int_tuple(self.block_out_channels, "block_out_channels"))
        levels_with_attention = sorted(set(_as_int_tuple(self.attention_levels, "attention_levels")))
        object.__setattr__(self, "attention_levels", tuple(levels_with_attention))
        for name, minimum in (("sample_size", 1), ("in_channels", 1), ("out_channels", 1),
                              ("layers_per_block", 1), ("norm_num_groups", 1)):
            _check_int(getattr(self, name), name, minimum)
        channels = self.block_out_channels
        if not channels:
            raise ValueError("block_out_channels must name at least one level, got ()")
        if any(c < 1 for c in channels):
            raise ValueError(f"block_out_channels must be positive, got {channels}")
        levels = len(channels)
        for level in self.attention_levels:
            if not 0 <= level < levels:
                raise ValueError(
                    f"attention_levels has level {level}, but block_out_channels {channels} "
                    f"gives levels 0..{levels - 1}"
                )
        bad = [c for c in channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of block_out_channels {channels}"
            )
        if self.sample_size % self.downsample_factor:
            raise ValueError(
                f"sample_size={self.sample_size} must be divisible by 2**(levels-1)={self.downsample_factor}"
            )
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive float, got {self.norm_eps!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.flip_sin_to_cos, bool):
            raise TypeError(f"flip_sin_to_cos must be a bool, got {self.flip_sin_to_cos!r}")
        if not isinstance(self.freq_shift, (int, float)) or isinstance(self.freq_shift, bool):
            raise TypeError(f"freq_shift must be a number, got {self.freq_shift!r}")
        if channels[0] // 2 - self.freq_shift == 0:
            raise ValueError(
                f"freq_shift={self.freq_shift} equals half the embedding width: the sinusoid divides by zero"
            )
        if self.attention_head_dim is not None:
            _check_int(self.attention_head_dim, "attention_head_dim", 1)
            for level in (*self.attention_levels, levels - 1):
                if channels[level] % self.attention_head_dim:
                    raise ValueError(
                        f"attention_head_dim={self.attention_head_dim} must divide the {channels[level]} channels "
                        f"of attention level {level} (and of the middle block)"
                    )

    # -- derived views ------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """How much the lowest level shrinks the image: H and W must be divisible by it."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        """The feature-map sizes (for a ``sample_size`` input) at which attention runs, largest first."""
        return tuple(self.sample_size // 2**level for level in self.attention_levels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists); ``UNetConfig.from_dict(c.to_dict()) == c``."""
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Build a config from ``to_dict()`` output; an unknown key raises a ValueError naming it."""
        if not isinstance(d, dict):
            raise TypeError(f"UNetConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig key {unknown[0]!r}: known keys are {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes) -> "UNetConfig":
        return dataclasses.replace(self, **changes)

    # -- presets ------------------------------------------------------------------------------------
    @classmethod
    def cifar10(cls, **overrides) -> "UNetConfig":
        """Ho et al.'s CIFAR-10 model (diffusers ``google/ddpm-cifar10-32``): 35,746,307 parameters."""
        return cls(**{**dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                             layers_per_block=2, attention_levels=(1,), dropout=0.1), **overrides})

    @classmethod
    def celebahq256(cls, **overrides) -> "UNetConfig":
        """diffusers' six-level 256x256 layout (``google/ddpm-celebahq-256``, the LSUN models): attention at 16x16."""
        return cls(**{**dict(sample_size=256, in_channels=3, out_channels=3,
                             block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                             attention_levels=(4,), dropout=0.0), **overrides})

    @classmethod
    def digits(cls, **overrides) -> "UNetConfig":
        """A small model (1.1M parameters) for the bundled 8x8 grayscale digits: 8x8, 4x4 and 2x2 levels,
        attention at 4x4 (and in the 2x2 middle block), 8 groups.

        Sized so one forward+backward at batch 128 takes well under 0.1 s on two CPU cores (about 70 ms
        measured, channels-last); (64, 128) costs nearly 3x that for little gain on 8x8 images.
        """
        return cls(**{**dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                             layers_per_block=1, attention_levels=(1,), norm_num_groups=8, dropout=0.0), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        """A 177k-parameter model for tests (16x16, two levels, attention at 8x8, 8 groups, one resnet per level)."""
        return cls(**{**dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                             layers_per_block=1, attention_levels=(1,), norm_num_groups=8, dropout=0.0), **overrides})


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding`` (max period 10000, scale 1): t (B,) any real dtype -> (B, dim) float32.

    freqs = exp(-ln(10000) * arange(dim // 2) / (dim // 2 - freq_shift)); [sin, cos] of t * freqs
    (cos first when flipped), zero-padded to an odd dim.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 (+ projected time embedding) -> GN -> SiLU -> dropout -> conv3x3, plus the shortcut.

    The time projection ``time_emb_proj(silu(temb))`` is computed by the U-Net (or read from its table) and
    passed in as ``temb_proj`` (B, out_channels); ``temb_index`` is this block's slot in that list.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 dropout: float, temb_index: int):
        super().__init__()
        self.in_channels, self.out_channels, self.temb_index = in_channels, out_channels, temb_index
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_proj: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        # The table path holds fp32 rows; casting to h's dtype keeps the add in the activation dtype,
        # which is what diffusers' path gives under autocast (its projection comes out of a bf16 linear).
        h = h + temb_proj[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Attention(nn.Module):
    """GroupNorm -> q, k, v (Linear over the (B, HW, C) sequence) -> softmax attention -> to_out.0 -> + x.

    ``heads = C // head_dim``; the scale is diffusers' ``head_dim ** -0.5``. With a channels-last input
    the (B, HW, C) sequence is a free view, so no transpose copies are made.
    """

    def __init__(self, channels: int, head_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.head_dim = channels if head_dim is None else head_dim
        self.heads = channels // self.head_dim
        self.scale = self.head_dim**-0.5
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' name: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        seq = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(seq).view(B, H * W, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, HW, d)

        out = F.scaled_dot_product_attention(heads(self.to_q), heads(self.to_k), heads(self.to_v), scale=self.scale)
        out = self.to_out[0](out.transpose(1, 2).reshape(B, H * W, C))
        return out.transpose(1, 2).reshape(B, C, H, W) + x


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) then a 3x3 stride-2 conv: TensorFlow's SAME padding, diffusers' downsample_padding=0."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The NHWC nearest kernel fails past 2**31 output elements (pytorch#141831); a shape check, no sync.
        if x.numel() * 4 > 2**31:
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """``layers_per_block`` resnets (each followed by attention on attention levels), then a downsampler.

    Returns the block output and the skips it saves (every resnet/attention output and the downsampler's).
    """

    def __init__(self, resnets: list[ResnetBlock], attentions: list[Attention], downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsamplers = nn.ModuleList([Downsample(resnets[-1].out_channels)]) if downsample else None

    def forward(self, h: torch.Tensor, temb_projs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb_projs[resnet.temb_index])
            if len(self.attentions):
                h = self.attentions[j](h)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, resnets: list[ResnetBlock], attention: Attention):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])

    def forward(self, h: torch.Tensor, temb_projs) -> torch.Tensor:
        h = self.resnets[0](h, temb_projs[self.resnets[0].temb_index])
        h = self.attentions[0](h)
        return self.resnets[1](h, temb_projs[self.resnets[1].temb_index])


class UpBlock(nn.Module):
    """``layers_per_block + 1`` resnets, each fed ``cat([h, skip])`` with the most recent skip, then an upsampler."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[Attention], upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsamplers = nn.ModuleList([Upsample(resnets[-1].out_channels)]) if upsample else None

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb_projs) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb_projs[resnet.temb_index])
            if len(self.attentions):
                h = self.attentions[j](h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class UNet(nn.Module):
    """The DDPM noise predictor: ``model(x, t) -> eps``, what diffusers' ``UNet2DModel`` computes.

    Time-embedding table (for samplers): ``precompute_time_embeddings(T)`` evaluates, for every
    t in 0..T-1, the sinusoid, the time MLP and every resblock's ``time_emb_proj(silu(temb))``, and keeps
    them as one (T, sum of resblock widths) float32 buffer; forward then gathers rows from it instead of
    running the MLP and the projections each step. Rows depend on t alone, so results equal the normal
    path (up to fp32 matmul blocking). The table is a snapshot of the current weights and is for inference:
    call ``clear_time_embeddings()`` before training or after changing weights (forward in train mode
    refuses to use it, since gradients would not reach the time MLP).
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        if config is None:
            config = UNetConfig()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet needs a UNetConfig, got {type(config).__name__}")
        self.config = config
        c = config
        channels = c.block_out_channels
        temb_dim = c.time_embed_dim
        levels = c.num_levels
        resnet_order: list[ResnetBlock] = []

        def resnet(cin: int, cout: int) -> ResnetBlock:
            block = ResnetBlock(cin, cout, temb_dim, c.norm_num_groups, c.norm_eps, c.dropout, len(resnet_order))
            resnet_order.append(block)
            return block

        def attention(ch: int) -> Attention:
            return Attention(ch, c.attention_head_dim, c.norm_num_groups, c.norm_eps)

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        cout = channels[0]
        for level in range(levels):
            cin, cout = cout, channels[level]
            resnets = [resnet(cin if j == 0 else cout, cout) for j in range(c.layers_per_block)]
            attns = [attention(cout) for _ in resnets] if level in c.attention_levels else []
            self.down_blocks.append(DownBlock(resnets, attns, downsample=level < levels - 1))

        self.mid_block = MidBlock([resnet(channels[-1], channels[-1]), resnet(channels[-1], channels[-1])],
                                  attention(channels[-1]))

        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        cout = reversed_channels[0]
        for i in range(levels):
            level = levels - 1 - i
            prev, cout = cout, reversed_channels[i]
            skip_last = reversed_channels[min(i + 1, levels - 1)]  # the skip saved before this level's resnets
            n = c.layers_per_block + 1
            resnets = [resnet((prev if j == 0 else cout) + (skip_last if j == n - 1 else cout), cout) for j in range(n)]
            attns = [attention(cout) for _ in resnets] if level in c.attention_levels else []
            self.up_blocks.append(UpBlock(resnets, attns, upsample=level > 0))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, 3, padding=1)

        # A plain list (not a ModuleList): the blocks are already registered; this only fixes their order.
        self._resnet_order = resnet_order
        self._temb_widths = [r.out_channels for r in resnet_order]
        self.register_buffer("time_embedding_table", None, persistent=False)

    # -- conveniences -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- time embedding -----------------------------------------------------------------------------
    def _time_mlp_projections(self, t: torch.Tensor) -> list[torch.Tensor]:
        emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                 self.config.freq_shift)
        # diffusers casts the fp32 sinusoid to the model's dtype before the MLP.
        emb = F.silu(self.time_embedding(emb.to(self.time_embedding.linear_1.weight.dtype)))
        return [r.time_emb_proj(emb) for r in self._resnet_order]

    @torch.no_grad()
    def precompute_time_embeddings(self, num_timesteps: int) -> torch.Tensor:
        """Store every resblock's time projection for t = 0..num_timesteps-1 and use it in forward.

        Returns the (num_timesteps, sum of resblock widths) float32 table (on the model's device). Computed
        in fp32 outside autocast. Forward with this table needs integer t in 0..num_timesteps-1 (not checked
        on device tensors: that would sync).
        """
        if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        t = torch.arange(num_timesteps, device=self.device)
        with torch.autocast(self.device.type, enabled=False):
            table = torch.cat([p.float() for p in self._time_mlp_projections(t)], dim=1).contiguous()
        self.time_embedding_table = table
        return table

    def clear_time_embeddings(self) -> None:
        """Drop the table: forward runs the time MLP again."""
        self.time_embedding_table = None

    def _time_projections(self, t: torch.Tensor) -> list[torch.Tensor]:
        table = self.time_embedding_table
        if table is None:
            return self._time_mlp_projections(t)
        if self.training:
            raise RuntimeError(
                "the precomputed time-embedding table is for inference: call clear_time_embeddings() before training"
            )
        return list(table.index_select(0, t.to(table.device)).split(self._temb_widths, dim=1))

    # -- input checks (shapes only: no host syncs) --------------------------------------------------
    def _check_input(self, x) -> None:
        check_image_batch(x)
        B, C, H, W = x.shape
        if B == 0:
            raise ValueError("x has an empty batch (B=0)")
        if C != self.config.in_channels:
            raise ValueError(f"x has {C} channels but the model takes in_channels={self.config.in_channels}")
        f = self.config.downsample_factor
        if H % f or W % f:
            raise ValueError(
                f"x's spatial size {H}x{W} must be divisible by 2**(levels-1)={f}: the U-Net halves it "
                f"{self.config.num_levels - 1} times"
            )

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """Predict the noise in ``x`` at timestep ``t``.

        x: (B, in_channels, H, W) floating tensor, H and W divisible by 2**(levels-1), any memory format.
        t: a Python int, a 0-dim integer tensor (same t for the whole batch) or an integer (B,) tensor.
        Returns eps: (B, out_channels, H, W) in the activation dtype (x's dtype, or bf16 under autocast).
        """
        self._check_input(x)
        table = self.time_embedding_table
        t = timesteps_for_batch(t, x.shape[0], x.device, None if table is None else table.shape[0])
        temb_projs = self._time_projections(t)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb_projs)
            skips.extend(block_skips)
        h = self.mid_block(h, temb_projs)
        for block in self.up_blocks:
            h = block(h, skips, temb_projs)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
