"""diffusers interop: configs both ways, loading folders and in-memory UNet2DModels (current and legacy
attention names, safetensors and .bin), saving in diffusers' layout for UNet2DModel.from_pretrained, and
one-line errors for unsupported configs and broken folders."""

import json

import pytest
import torch

from ddpm_fast import UNet, UNetConfig, load_diffusers_unet, save_diffusers_unet
from ddpm_fast.diffusers_io import (
    BIN_NAME,
    CONFIG_NAME,
    DIFFUSERS_DEFAULTS,
    SAFETENSORS_NAME,
    diffusers_config_from_unet,
    unet_config_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from random_weights import randomise  # noqa: E402

# config.json of the hub's google/ddpm-cifar10-32 and google/ddpm-celebahq-256 U-Nets (keys they omit take
# UNet2DModel's defaults).
HUB_CIFAR10 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.1.1", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
HUB_CELEBAHQ256 = {
    **HUB_CIFAR10, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
SMALL = dict(  # diffusers kwargs of a small DDPM-family model: two attention levels, multi-head
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
    flip_sin_to_cos=False, freq_shift=1, attention_head_dim=8, downsample_padding=0, dropout=0.0,
)


def random_diffusers(kwargs=SMALL, seed=0) -> UNet2DModel:
    model = UNet2DModel(**kwargs)
    randomise(model, seed)
    return model.eval()


def sample_inputs(config: UNetConfig, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g)


def assert_same_outputs(ours: UNet, theirs: UNet2DModel, rel=1e-5, seed=1) -> None:
    x, t = sample_inputs(ours.config, seed=seed)
    with torch.no_grad():
        ref = theirs(x, t).sample
        out = ours(x, t)
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item()
    assert scale > 0.1
    err = (out - ref).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


def write_folder(folder, config: dict, state_dict: dict, fmt="safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / SAFETENSORS_NAME))
    else:
        torch.save(state_dict, folder / BIN_NAME)
    return folder


def legacy_names(state_dict: dict) -> dict:
    """Rename to_q/to_k/to_v/to_out.0 to the old query/key/value/proj_attn, as the hub's DDPM checkpoints spell them."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for key, value in state_dict.items():
        for new, old in renames.items():
            if ".attentions." in key and new in key:
                key = key.replace(new, old)
        out[key] = value
    return out


# -- configs --------------------------------------------------------------------------------------------
def test_defaults_table_is_diffusers_signature():
    import inspect

    params = inspect.signature(UNet2DModel.__init__).parameters
    assert {k: p.default for k, p in params.items() if k != "self"} == DIFFUSERS_DEFAULTS


@pytest.mark.parametrize("hub,preset", [(HUB_CIFAR10, "cifar10"), (HUB_CELEBAHQ256, "celebahq256")])
def test_hub_configs_convert_to_presets_and_back(hub, preset):
    expected = getattr(UNetConfig, preset)()
    # The hub configs carry no dropout key (diffusers' default 0.0); Ho trained CIFAR-10 with 0.1.
    assert unet_config_from_diffusers(hub) == expected.replace(dropout=0.0)
    back = diffusers_config_from_unet(expected)
    assert json.loads(json.dumps(back)) == back
    assert unet_config_from_diffusers(back) == expected
    for key, value in hub.items():
        if not key.startswith("_"):
            assert back[key] == value, key
    # Both sides build the same tensors (on the meta device: no memory, no init cost).
    with torch.device("meta"):
        theirs = UNet2DModel.from_config(back)
        ours = UNet(expected)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_missing_keys_take_diffusers_defaults():
    # Without downsample_padding diffusers pads symmetrically (default 1): outside the family, and said so.
    config = {k: v for k, v in HUB_CIFAR10.items() if k != "downsample_padding"}
    with pytest.raises(ValueError, match=r"downsample_padding=1"):
        unet_config_from_diffusers(config)
    # Without attention_head_dim diffusers uses 8-channel heads.
    config = {k: v for k, v in HUB_CIFAR10.items() if k != "attention_head_dim"}
    assert unet_config_from_diffusers(config).attention_head_dim == 8


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
         "down_block_types has 'CrossAttnDownBlock2D'"),
        ("up_block_types", ["UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D"], "up_block_types .* must mirror"),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "up_block_types has 3 entries"),
        ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift'"),
        ("class_embed_type", "timestep", "class_embed_type='timestep'"),
        ("num_class_embeds", 10, "num_class_embeds=10"),
        ("add_attention", False, "add_attention=False"),
        ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
        ("center_input_sample", True, "center_input_sample=True"),
        ("mid_block_type", None, "mid_block_type=None"),
        ("mid_block_scale_factor", 2, "mid_block_scale_factor=2"),
        ("act_fn", "gelu", "act_fn='gelu'"),
        ("downsample_type", "resnet", "downsample_type='resnet'"),
        ("attn_norm_num_groups", 8, "attn_norm_num_groups=8"),
        ("time_embedding_dim", 256, "time_embedding_dim=256"),
        ("norm_num_groups", 48, "norm_num_groups=48 must divide"),
        ("attention_head_dim", 48, "attention_head_dim=48 must divide"),
        ("sample_size", [32, 64], r"sample_size=\[32, 64\]"),
        ("_class_name", "UNet2DConditionModel", "_class_name is 'UNet2DConditionModel'"),
    ],
)
def test_unsupported_configs_raise_naming_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**HUB_CIFAR10, key: value})


def test_unsupported_in_memory_model_is_refused():
    model = UNet2DModel(**{**SMALL, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        load_diffusers_unet(model)


# -- loading --------------------------------------------------------------------------------------------
def test_in_memory_model_loads_with_identical_outputs():
    theirs = random_diffusers()
    ours = load_diffusers_unet(theirs)
    assert isinstance(ours, UNet) and not ours.training
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("spelling", ["current", "legacy"])
def test_folder_loads_both_attention_spellings(tmp_path, fmt, spelling):
    theirs = random_diffusers(seed=2)
    state = theirs.state_dict()
    if spelling == "legacy":
        state = legacy_names(state)
        assert any(".proj_attn." in k for k in state) and not any(".to_q." in k for k in state)
    config = {"_class_name": "UNet2DModel", **theirs.config}
    ours = load_diffusers_unet(write_folder(tmp_path / "unet", config, state, fmt))
    assert not ours.training
    assert_same_outputs(ours, theirs)


def test_legacy_1x1_conv_attention_weights_load(tmp_path):
    """Ho's TF port stored q/k/v/proj_out as 1x1 convs: (C, C, 1, 1) weights load as Linear weights."""
    theirs = random_diffusers(seed=3)
    state = legacy_names(theirs.state_dict())
    state = {k: (v[:, :, None, None] if ".attentions." in k and k.endswith("weight") and v.ndim == 2 else v)
             for k, v in state.items()}
    ours = load_diffusers_unet(write_folder(tmp_path / "m", dict(theirs.config), state))
    assert_same_outputs(ours, theirs)


def test_six_level_layout_loads(tmp_path):
    kwargs = {**{k: v for k, v in HUB_CELEBAHQ256.items() if not k.startswith("_")},
              "block_out_channels": (32, 32, 64, 64, 64, 64), "sample_size": 64}
    theirs = random_diffusers(kwargs, seed=4)
    ours = load_diffusers_unet(write_folder(tmp_path / "m", dict(theirs.config), legacy_names(theirs.state_dict())))
    assert ours.config.attention_levels == (4,) and ours.config.attention_resolutions == (4,)
    assert_same_outputs(ours, theirs)


def test_pipeline_folder_with_unet_subfolder(tmp_path):
    theirs = random_diffusers(seed=5)
    theirs.save_pretrained(tmp_path / "pipe" / "unet")
    assert_same_outputs(load_diffusers_unet(tmp_path / "pipe"), theirs)


# -- saving ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_save_round_trips_through_diffusers(tmp_path, channels_last):
    torch.manual_seed(6)
    ours = UNet(UNetConfig.tiny(attention_head_dim=8, flip_sin_to_cos=True, freq_shift=0, dropout=0.1)).eval()
    randomise(ours, seed=6)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    folder = save_diffusers_unet(ours, tmp_path / "out" / "model")
    # no temp files left; SHA256SUMS records the weights (checked on load, see test_checkpoint.py)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, SAFETENSORS_NAME, "SHA256SUMS"])
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["_class_name"] == "UNet2DModel" and config["dropout"] == 0.1

    theirs = UNet2DModel.from_pretrained(folder).eval()
    assert theirs.config.flip_sin_to_cos is True and theirs.config.freq_shift == 0
    assert_same_outputs(ours, theirs)

    again = load_diffusers_unet(folder)
    assert again.config == ours.config
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_save_overwrites_and_unwraps_compiled(tmp_path):
    first = UNet(UNetConfig.tiny())
    second = UNet(UNetConfig.tiny(out_channels=6))
    save_diffusers_unet(first, tmp_path)
    save_diffusers_unet(torch.compile(second, backend="eager"), tmp_path)
    assert load_diffusers_unet(tmp_path).config.out_channels == 6


def test_save_refuses_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="ddpm_fast UNet"):
        save_diffusers_unet(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_diffusers_unet(UNet(UNetConfig.tiny()), tmp_path / "file")


# -- broken inputs --------------------------------------------------------------------------------------
def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers model folder"):
        load_diffusers_unet(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_diffusers_unet(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(diffusers_config_from_unet(UNetConfig.tiny())))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_diffusers_unet(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        load_diffusers_unet(tmp_path / CONFIG_NAME)
    with pytest.raises(TypeError, match="folder path or a diffusers UNet2DModel"):
        load_diffusers_unet(UNet(UNetConfig.tiny()))


@pytest.mark.parametrize("name", [SAFETENSORS_NAME, BIN_NAME])
def test_corrupt_weights_raise_one_line(tmp_path, name):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(diffusers_config_from_unet(UNetConfig.tiny())))
    (tmp_path / name).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read weights") as info:
        load_diffusers_unet(tmp_path)
    assert "\n" not in str(info.value)


def test_corrupt_config_raises(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        load_diffusers_unet(tmp_path)


def test_weights_not_matching_the_config(tmp_path):
    config = diffusers_config_from_unet(UNetConfig.tiny())
    state = UNet(UNetConfig.tiny()).state_dict()
    missing = {k: v for k, v in state.items() if k != "conv_out.bias"}
    with pytest.raises(ValueError, match="lacks 1 weight tensor.*'conv_out.bias'"):
        load_diffusers_unet(write_folder(tmp_path / "a", config, missing))
    extra = {**state, "class_embedding.weight": torch.zeros(3, 64)}
    with pytest.raises(ValueError, match="does not use.*'class_embedding.weight'"):
        load_diffusers_unet(write_folder(tmp_path / "b", config, extra))
    wrong = {**state, "conv_in.weight": torch.zeros(16, 3, 5, 5)}
    shape_message = r"'conv_in.weight' has shape \(16, 3, 5, 5\), the config needs \(16, 3, 3, 3\)"
    with pytest.raises(ValueError, match=shape_message):
        load_diffusers_unet(write_folder(tmp_path / "c", config, wrong))
    both = {**state, "down_blocks.1.attentions.0.query.weight": state["down_blocks.1.attentions.0.to_q.weight"].clone()}
    with pytest.raises(ValueError, match="both the legacy and the current name"):
        load_diffusers_unet(write_folder(tmp_path / "d", config, both))
