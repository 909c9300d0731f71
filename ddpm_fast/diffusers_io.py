"""diffusers interop: load a ``UNet2DModel`` (folder or in-memory) as our :class:`~ddpm_fast.unet.UNet`, and
save ours in diffusers' folder layout so ``UNet2DModel.from_pretrained(folder)`` reads it.

Our module tree uses diffusers' state-dict names, so the weight conversion is the identity apart from the
legacy attention names (``query``/``key``/``value``/``proj_attn``, used by the hub's DDPM checkpoints),
which become ``to_q``/``to_k``/``to_v``/``to_out.0``. Configs outside the DDPM family raise a ValueError
naming the key. Nothing here imports diffusers: folders are read and written with json + safetensors.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path

import torch

from .checks import model_device
from .unet import UNet, UNetConfig

__all__ = [
    "load_diffusers_unet",
    "save_diffusers_unet",
    "unet_config_from_diffusers",
    "diffusers_config_from_unet",
    "convert_legacy_attention_names",
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "BIN_NAME",
]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"

# UNet2DModel.__init__'s defaults (diffusers 0.42): a key missing from a config.json means this value.
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Keys whose value must be exactly this for the DDPM family (what our UNet implements).
_REQUIRED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
_WHY = {
    "downsample_padding": "the DDPM family pads (0, 1, 0, 1) before the stride-2 conv",
    "add_attention": "the middle block always has attention here",
    "mid_block_scale_factor": "resnet outputs are not rescaled here",
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.42.1"


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Translate a ``UNet2DModel`` config (config.json contents, or ``model.config``) into a :class:`UNetConfig`.

    Missing keys take diffusers' defaults; ``_``-prefixed metadata and keys UNet2DModel does not know are
    ignored (diffusers ignores them too). A config outside the DDPM family raises a ValueError naming the key.
    """
    if not hasattr(config, "items"):
        raise TypeError(f"a diffusers config must be a dict, got {type(config).__name__}")
    config = dict(config)
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"_class_name is {class_name!r}: only diffusers' UNet2DModel is supported")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DEFAULTS}}

    for key, want in _REQUIRED.items():
        if c[key] != want:
            why = _WHY.get(key, "outside the DDPM U-Net family this package implements")
            raise ValueError(f"unsupported diffusers config: {key}={c[key]!r} (only {want!r}: {why})")
    if c["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"unsupported diffusers config: act_fn={c['act_fn']!r} (only 'silu')")

    channels = c["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels:
        raise ValueError(f"unsupported diffusers config: block_out_channels={channels!r} (a non-empty list of ints)")
    levels = len(channels)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for key, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        bad = [b for b in types if b not in known]
        if bad:
            raise ValueError(f"unsupported diffusers config: {key} has {bad[0]!r} (only {' and '.join(known)})")
        if len(types) != levels:
            raise ValueError(f"unsupported diffusers config: {key} has {len(types)} entries but block_out_channels "
                             f"has {levels}")
    attention_levels = tuple(i for i, b in enumerate(down) if _DOWN[b])
    up_attention_levels = tuple(sorted(levels - 1 - i for i, b in enumerate(up) if _UP[b]))
    if up_attention_levels != attention_levels:
        raise ValueError(
            f"unsupported diffusers config: up_block_types {up} must mirror down_block_types {down} "
            "(attention at the same levels on the way down and up)"
        )

    temb_dim = c["time_embedding_dim"]
    if temb_dim is not None and temb_dim != 4 * channels[0]:
        raise ValueError(f"unsupported diffusers config: time_embedding_dim={temb_dim!r} (only None, i.e. "
                         f"4 * block_out_channels[0] = {4 * channels[0]})")
    groups = c["norm_num_groups"]
    if groups is None:
        raise ValueError("unsupported diffusers config: norm_num_groups=None (an int is needed)")
    if c["attn_norm_num_groups"] not in (None, groups):
        raise ValueError(f"unsupported diffusers config: attn_norm_num_groups={c['attn_norm_num_groups']!r} "
                         f"(only None or norm_num_groups={groups})")

    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"unsupported diffusers config: sample_size={size!r} (square images only)")
        size = size[0]
    if size is None:
        raise ValueError("unsupported diffusers config: sample_size=None (the image size is needed)")

    try:
        return UNetConfig(
            sample_size=size,
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            block_out_channels=tuple(channels),
            layers_per_block=c["layers_per_block"],
            attention_levels=attention_levels,
            norm_num_groups=groups,
            norm_eps=c["norm_eps"],
            dropout=c["dropout"],
            flip_sin_to_cos=c["flip_sin_to_cos"],
            freq_shift=c["freq_shift"],
            attention_head_dim=c["attention_head_dim"],
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unsupported diffusers config: {exc}") from None


def diffusers_config_from_unet(config: UNetConfig | UNet) -> dict:
    """The ``UNet2DModel`` config (a JSON-able dict, with ``_class_name``) equivalent to ``config``."""
    if isinstance(config, UNet):
        config = config.config
    if not isinstance(config, UNetConfig):
        raise TypeError(f"diffusers_config_from_unet needs a UNetConfig or UNet, got {type(config).__name__}")
    levels = config.num_levels
    attn = set(config.attention_levels)
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": _diffusers_version(),
        **DIFFUSERS_DEFAULTS,
        **_REQUIRED,
        "sample_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "freq_shift": config.freq_shift,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "down_block_types": ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpBlock2D" if levels - 1 - i in attn else "UpBlock2D" for i in range(levels)],
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "dropout": config.dropout,
        "act_fn": "silu",
        "attention_head_dim": config.attention_head_dim,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
    }


_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_TARGET = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_legacy_attention_names(state_dict: dict) -> dict:
    """Rename old diffusers attention weights (query, key, value, proj_attn) to to_q, to_k, to_v, to_out.0.

    1x1-conv shaped weights (C, C, 1, 1) become Linear weights (C, C). Other keys pass through.
    """
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_ATTENTION.match(key)
        if m:
            key = f"{m.group(1)}.{_LEGACY_TARGET[m.group(2)]}.{m.group(3)}"
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        if key in out:
            raise ValueError(f"weights hold attention tensor {key!r} under both the legacy and the current name")
        out[key] = value
    return out


def _load_state_dict_into(unet: UNet, state_dict: dict, source: str) -> UNet:
    state_dict = convert_legacy_attention_names(state_dict)
    expected = unet.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} weight tensor(s) the config needs, e.g. {missing[0]!r}")
    if unexpected:
        raise ValueError(f"{source} has {len(unexpected)} weight tensor(s) the config does not use, "
                         f"e.g. {unexpected[0]!r}")
    for key, ref in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)}, the config needs {tuple(ref.shape)}")
    unet.load_state_dict(state_dict, strict=True)
    return unet


def _read_weights(path: Path) -> dict:
    from .integrity import verify_file

    verify_file(path)  # a folder ddpm-fast exported carries SHA256SUMS; diffusers' and the hub's do not
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and pickle raise many types; all mean "unreadable"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read weights {path}: {first_line}") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"cannot read weights {path}: it holds a {type(state_dict).__name__}, not a state dict")
    return state_dict


def _model_folder(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no diffusers model folder at {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file: pass the folder holding {CONFIG_NAME} and {SAFETENSORS_NAME}")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "unet" / CONFIG_NAME).is_file():  # a saved DDPMPipeline keeps its U-Net in unet/
        return path / "unet"
    raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: a diffusers UNet2DModel folder holds {CONFIG_NAME} "
                            f"and {SAFETENSORS_NAME} (or {BIN_NAME})")


def load_diffusers_unet(path_or_model, *, device=None) -> UNet:
    """Load a diffusers ``UNet2DModel`` as our :class:`UNet`, with identical outputs.

    ``path_or_model``: a folder with config.json and diffusion_pytorch_model.safetensors (or .bin, read
    with ``torch.load(weights_only=True)``), a saved pipeline folder with a ``unet/`` subfolder, an
    in-memory ``UNet2DModel``, or a pipeline object with a ``.unet``. Both the current and the legacy
    attention weight names are accepted. The folder form returns the model in eval mode (like
    ``from_pretrained``); the in-memory form copies the source's training flag. Parameters are float32
    (cast from the checkpoint's dtype), on ``device`` (default CPU, or the in-memory model's device).
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        folder = _model_folder(Path(path_or_model))
        try:
            config_dict = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {folder / CONFIG_NAME}: {exc}") from None
        config = unet_config_from_diffusers(config_dict)
        for name in (SAFETENSORS_NAME, BIN_NAME):
            if (folder / name).is_file():
                weights_path = folder / name
                break
        else:
            raise FileNotFoundError(f"{folder} has no weights: expected {SAFETENSORS_NAME} or {BIN_NAME}")
        state_dict = _read_weights(weights_path)
        unet = _load_state_dict_into(UNet(config), state_dict, str(weights_path))
        unet.eval()
        return unet.to(device) if device is not None else unet

    model = getattr(path_or_model, "unet", path_or_model)  # a DDPMPipeline holds its U-Net as .unet
    if type(model).__name__ != "UNet2DModel" or not hasattr(model, "state_dict"):
        raise TypeError(f"load_diffusers_unet needs a folder path or a diffusers UNet2DModel, "
                        f"got {type(path_or_model).__name__}")
    config = unet_config_from_diffusers(dict(model.config))
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    if device is None:
        device = model_device(model)
    unet = _load_state_dict_into(UNet(config), state_dict, f"{type(model).__name__} state dict")
    unet.train(model.training)
    return unet.to(device)


def save_diffusers_unet(unet: UNet, folder) -> Path:
    """Write ``unet`` in diffusers' layout: ``folder/config.json`` + ``folder/diffusion_pytorch_model.safetensors``.

    ``UNet2DModel.from_pretrained(folder)`` then gives the same outputs. Tensors keep their dtype and are
    stored contiguous on the CPU. A torch.compile'd model is unwrapped. Returns the folder as a Path.
    """
    unet = getattr(unet, "_orig_mod", unet)
    if not isinstance(unet, UNet):
        raise TypeError(f"save_diffusers_unet needs a ddpm_fast UNet, got {type(unet).__name__}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file: pass a folder to write the model into")
    folder.mkdir(parents=True, exist_ok=True)

    from .checkpoint import save_safetensors, write_json_atomic, write_sums

    # contiguous CPU copies: safetensors refuses shared or non-contiguous (channels-last) storage
    save_safetensors(folder / SAFETENSORS_NAME, unet.state_dict(), {"format": "pt"})
    write_json_atomic(folder / CONFIG_NAME, diffusers_config_from_unet(unet.config))
    write_sums(folder, [SAFETENSORS_NAME])  # loading verifies the weights against it (integrity.py)
    return folder
