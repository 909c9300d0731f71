"""UNet / UNetConfig: diffusers' UNet2DModel is the oracle (random weights, every parameter randomised,
GroupNorm affines included), over the CIFAR-10 layout, a reduced six-level 256x256-style layout and small
layouts; channels-last and bf16 autocast against fp32; the time-embedding table against the MLP path;
input validation."""

import json

import pytest
import torch

from ddpm_fast import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from random_weights import randomise  # noqa: E402
from tolerances import U, assert_within, projection_rounding_bound, rounding_response  # noqa: E402

# diffusers' own constructor arguments for each layout, written out here (not produced by our converter)
# so a converter bug cannot hide a model bug.
DDPM_COMMON = dict(
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    attention_head_dim=None, act_fn="silu", layers_per_block=2,
)
LAYOUTS = {
    # Ho et al.'s CIFAR-10 model (google/ddpm-cifar10-32).
    "cifar10": (
        UNetConfig.cifar10(),
        dict(DDPM_COMMON, sample_size=32, block_out_channels=(128, 256, 256, 256),
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1),
    ),
    # The six-level CelebA-HQ/LSUN 256x256 structure with fewer channels, at 64x64 (attention at level 4).
    "six_level": (
        UNetConfig(sample_size=64, block_out_channels=(32, 32, 64, 64, 64, 64), attention_levels=(4,), dropout=0.0),
        dict(DDPM_COMMON, sample_size=64, block_out_channels=(32, 32, 64, 64, 64, 64),
             down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, dropout=0.0),
    ),
    # Small, multi-head (head dim 8), flipped sinusoid, no shift, attention at two levels, 8 groups.
    "small_multihead": (
        UNetConfig(sample_size=16, in_channels=2, out_channels=5, block_out_channels=(16, 32, 32), layers_per_block=1,
                   attention_levels=(0, 2), norm_num_groups=8, norm_eps=1e-5, dropout=0.0, flip_sin_to_cos=True,
                   freq_shift=0, attention_head_dim=8),
        dict(sample_size=16, in_channels=2, out_channels=5, block_out_channels=(16, 32, 32), layers_per_block=1,
             down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
             norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, attention_head_dim=8,
             downsample_padding=0, dropout=0.0),
    ),
    "digits": (
        UNetConfig.digits(),
        dict(DDPM_COMMON, sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
             layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.0),
    ),
}


def pair(layout: str, seed: int = 0, dropout: float | None = None):
    """(ours, theirs) in eval mode with the same random weights, copied by name."""
    config, diffusers_kwargs = LAYOUTS[layout]
    if dropout is not None:
        config, diffusers_kwargs = config.replace(dropout=dropout), dict(diffusers_kwargs, dropout=dropout)
    theirs = UNet2DModel(**diffusers_kwargs)
    randomise(theirs, seed)
    ours = UNet(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def inputs(config: UNetConfig, batch: int, seed: int, size=None):
    g = torch.Generator().manual_seed(seed)
    h, w = size or (config.sample_size, config.sample_size)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    t[0] = 999  # the ends of the range, where sinusoid arguments are largest / zero
    if batch > 1:
        t[-1] = 0
    return x, t


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """Every element within rel * max|ref| (errors are measured against the output's scale)."""
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output"
    scale = ref.abs().max().item()
    assert scale > 0.1, "degenerate reference"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * scale {scale:.3g}"


# ---------------------------------------------------------------------------------------------------
def test_cifar10_preset_is_hos_model():
    model = UNet(UNetConfig.cifar10())
    assert model.num_parameters() == 35_746_307
    state = model.state_dict()
    assert len(state) == 328
    assert "down_blocks.1.attentions.0.to_out.0.weight" in state
    assert "up_blocks.2.attentions.2.to_q.weight" in state
    assert "down_blocks.3.downsamplers.0.conv.weight" not in state  # the last level does not downsample
    assert UNetConfig.cifar10().attention_resolutions == (16,)
    assert UNetConfig.cifar10().dropout == 0.1


@pytest.mark.parametrize("preset", ["cifar10", "celebahq256", "digits", "tiny"])
def test_presets_have_diffusers_state_dict(preset):
    """Names and shapes of every tensor equal diffusers' for the same layout (built on the meta device)."""
    from ddpm_fast.diffusers_io import diffusers_config_from_unet

    config = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        ours = UNet(config)
        theirs = UNet2DModel.from_config(diffusers_config_from_unet(config))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }


@pytest.mark.parametrize(
    "layout,batch,size",
    [("cifar10", 2, None), ("six_level", 3, None), ("small_multihead", 1, None), ("small_multihead", 3, (8, 24)),
     ("digits", 5, None)],
)
def test_matches_diffusers_fp32(layout, batch, size):
    """The same network as diffusers', checked in float64 where a rounding-level bound is ~1e-13 of the
    output, so a wrong epsilon, scale or operation order that matters shows; float32 within its own bound."""
    ours, theirs = pair(layout)
    x, t = inputs(ours.config, batch, seed=1, size=size)
    with torch.no_grad():
        out = ours(x, t)
        assert out.dtype == torch.float32
        # one float32 evaluation's bound: the output's response to every layer's rounding at u = 2^-24
        # (one sign: to first order -bound mirrors +bound)
        bound32 = rounding_response(lambda: ours(x, t), ours, sides=1, signs=(1.0,), max_fraction=0.1)
        ours.double(), theirs.double()
        ref = theirs(x.double(), t).sample
        out64 = ours(x.double(), t)
    # float64, sums in another order (diffusers' formulation of attention, the time embedding, the
    # residual scales): both sides' bound, which scales with u (first order): 2 bound32 2^-53 / 2^-24
    assert_within(out64, ref, 2 * bound32 * U[torch.float64] / U[torch.float32], f"{layout} vs diffusers, float64")
    assert_within(out, ref, bound32, f"{layout} float32 vs exact")


def logical_dropout(x, p=0.5, training=True, inplace=False):
    """A deterministic stand-in for F.dropout: drops every third element by logical index, so masks do not
    depend on RNG state or memory layout (real masks follow the memory order, which differs between
    channels-last and contiguous activations)."""
    if not training or p == 0:
        return x
    keep = (torch.arange(x.numel(), device=x.device).view(x.shape) % 3 != 0).to(x.dtype)
    return x * keep / (1 - p)


def test_train_mode_dropout_sits_where_diffusers_has_it(monkeypatch):
    ours, theirs = pair("six_level", dropout=0.1)
    x, t = inputs(ours.config, 2, seed=2, size=(32, 32))
    with torch.no_grad():
        eval_out = ours(x, t)
        ours.train(), theirs.train()
        monkeypatch.setattr(torch.nn.functional, "dropout", logical_dropout)
        ref = theirs(x, t).sample
        out = ours(x, t)
        bound = rounding_response(lambda: ours(x, t), ours)
    assert_within(out, ref, bound, "train mode vs diffusers")
    assert (out - eval_out).abs().max() > 1e-2 * out.abs().max()  # dropout really acts in train mode


@pytest.mark.parametrize("layout", ["six_level", "small_multihead"])
def test_channels_last_and_bf16_autocast(layout):
    ours, theirs = pair(layout, seed=3)
    x, t = inputs(ours.config, 3, seed=4, size=(32, 32))  # bf16 convolutions are slow on CPU: keep it small
    with torch.no_grad():
        ref = theirs(x, t).sample
        cl_model = ours.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        out_cl = cl_model(x_cl, t)
        assert out_cl.is_contiguous(memory_format=torch.channels_last)
        # channels-last convolutions and GroupNorm sum in another order than diffusers' contiguous ones
        assert_within(out_cl, ref, rounding_response(lambda: cl_model(x_cl, t), cl_model), "channels-last")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = cl_model(x_cl, t)
            theirs_bf16 = theirs(x, t).sample
    assert out_bf16.dtype == torch.bfloat16
    assert_close_to(out_bf16, ref, rel=3e-2)
    ours_rms = (out_bf16.float() - ref).pow(2).mean().sqrt()
    theirs_rms = (theirs_bf16.float() - ref).pow(2).mean().sqrt()
    assert ours_rms <= 2e-2 * ref.pow(2).mean().sqrt()
    assert ours_rms <= 1.5 * theirs_rms + 1e-3 * ref.pow(2).mean().sqrt()  # no worse than diffusers' own bf16


def test_timestep_forms_agree():
    ours, _ = pair("small_multihead")
    x, _ = inputs(ours.config, 3, seed=5)
    with torch.no_grad():
        ref = ours(x, torch.tensor([17, 17, 17]))
        for t in (17, torch.tensor(17), torch.tensor([17, 17, 17], dtype=torch.int32)):
            torch.testing.assert_close(ours(x, t), ref, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["six_level", "small_multihead"])
def test_time_embedding_table_equals_mlp_path(layout):
    ours, _ = pair(layout, seed=6)
    x, t = inputs(ours.config, 3, seed=7, size=(32, 32))
    with torch.no_grad():
        ref = ours(x, t)
        table = ours.precompute_time_embeddings(1000)
        widths = sum(m.out_channels for m in ours.modules() if type(m).__name__ == "ResnetBlock")
        assert table.shape == (1000, widths) and table.dtype == torch.float32
        out = ours(x, t)
        out_scalar = ours(x, 999)
        ours.clear_time_embeddings()
        assert ours.time_embedding_table is None
        again = ours(x, t)
        ref_scalar = ours(x, 999)
        # the MLP path's response to the rounding of every layer, the time projections included
        bound = rounding_response(lambda: ours(x, t), ours)
        bound_scalar = rounding_response(lambda: ours(x, 999), ours)
    # The table's rows equal the MLP's projections up to matmul blocking (1000 rows vs 3): within twice
    # Higham's bound of each projection; so do the outputs, within the network's response.
    with torch.no_grad():
        rows = torch.cat(ours._time_mlp_projections(t), dim=1)
    assert_within(table[t], rows, projection_rounding_bound(ours, t), "table rows")
    assert_within(out, ref, bound, "table vs MLP")
    assert_within(out_scalar, ref_scalar, bound_scalar, "table vs MLP, int t")
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    assert "time_embedding_table" not in ours.state_dict()


def test_time_embedding_table_refuses_training_and_out_of_range_int():
    model = UNet(UNetConfig.tiny())
    x = torch.randn(2, 3, 16, 16)
    model.precompute_time_embeddings(10)
    with pytest.raises(RuntimeError, match="clear_time_embeddings"):
        model.train()(x, 3)
    with pytest.raises(ValueError, match=r"t=10 is out of range"):
        model.eval()(x, 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        model.precompute_time_embeddings(0)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny())
    x = torch.randn(2, 3, 16, 16)
    model(x, torch.tensor([3, 500])).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad


def test_compiles_without_graph_breaks():
    """fullgraph tracing fails on host syncs (.item()) and data-dependent branches; the eager backend keeps
    this cheap (no code generation)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=0, atol=0)
        model.precompute_time_embeddings(1000)
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=0, atol=0)


def test_inductor_compiled_channels_last_matches_eager():
    """The one inductor compile of the U-Net (about a minute on CPU): the code torch.compile generates for
    a channels-last model, the fast path's layout, gives eager's numbers."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval().to(memory_format=torch.channels_last)
    randomise(model, seed=11)
    x = torch.randn(3, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 417, 999])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(x, t)
        out = torch.full_like(expected, float("nan"))
        out.copy_(compiled(x, t))
        # inductor's generated reductions (GroupNorm, softmax) and fused element-wise code sum in another
        # order than eager: the output's response to every layer's rounding, both sides
        bound = rounding_response(lambda: model(x, t), model)
    assert_within(out, expected, bound, "inductor vs eager")


@pytest.mark.parametrize(
    "x_shape,t,exc,match",
    [
        ((3, 16, 16), 1, ValueError, r"4-D \(B, C, H, W\)"),
        ((2, 4, 16, 16), 1, ValueError, "4 channels but the model takes in_channels=3"),
        ((2, 3, 16, 15), 1, ValueError, r"16x15 must be divisible by 2\*\*\(levels-1\)=2"),
        ((2, 3, 16, 16), torch.tensor([1, 2, 3]), ValueError, r"one entry per sample \(shape \(2,\)\)"),
        ((2, 3, 16, 16), torch.ones(2, 1, dtype=torch.long), ValueError, r"got shape \(2, 1\)"),
        ((2, 3, 16, 16), torch.tensor([1.0, 2.0]), TypeError, "integer timestep indices"),
        ((2, 3, 16, 16), 1.5, TypeError, "int or an integer tensor"),
        ((2, 3, 16, 16), True, TypeError, "bool"),
        ((2, 3, 16, 16), -1, ValueError, "t=-1 is out of range"),
        ((0, 3, 16, 16), 1, ValueError, "empty batch"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(x_shape, t, exc, match):
    model = UNet(UNetConfig.tiny())
    with pytest.raises(exc, match=match):
        model(torch.randn(x_shape), t)


def test_bad_input_types():
    model = UNet(UNetConfig.tiny())
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1.0]], 1)
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet({"sample_size": 32})


def test_config_round_trips_through_json():
    for config in (UNetConfig.cifar10(), UNetConfig.celebahq256(), UNetConfig.digits(),
                   UNetConfig.tiny(attention_head_dim=8)):
        assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert UNetConfig.celebahq256().attention_resolutions == (16,)
    assert UNetConfig.digits().attention_resolutions == (4,)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(attention_levels=(4,)), ValueError, "attention_levels has level 4"),
        (dict(norm_num_groups=24), ValueError, "norm_num_groups=24 must divide"),
        (dict(attention_head_dim=48), ValueError, "attention_head_dim=48 must divide"),
        (dict(sample_size=30), ValueError, r"sample_size=30 must be divisible by 2\*\*\(levels-1\)=8"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(block_out_channels=()), ValueError, "block_out_channels"),
        (dict(layers_per_block=0), ValueError, "layers_per_block must be >= 1"),
        (dict(block_out_channels=(128.0, 256)), TypeError, "block_out_channels must be a sequence of ints"),
    ],
)
def test_bad_configs_raise_naming_the_key(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        UNetConfig.cifar10(**kwargs)


def test_from_dict_refuses_unknown_key():
    d = UNetConfig.tiny().to_dict()
    d["num_heads"] = 4
    with pytest.raises(ValueError, match="unknown UNetConfig key 'num_heads'"):
        UNetConfig.from_dict(d)
