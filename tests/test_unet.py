"""Parity of `flash_jax.models.unet.UNet` with diffusers `UNet2DConditionModel` (PyTorch).

Tiny SD1-, SD2- and SDXL-shaped configs with random (perturbed) weights: import the torch state
dict, compare outputs and down/mid features, export back and reload with `strict=True`. Also the
conv layer's patch-matrix path for maps smaller than the kernel, against torch's conv2d.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from flash_jax import weights
from flash_jax.models import layers, unet

TOL = 1e-4  # relative L2

CONFIGS = {
    # SD1.x: 1x1-conv projections, int head count, cross-attention down/up blocks.
    "sd1": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SD2.x-like: linear projections, per-block head counts, upcast attention, scale-shift
    # resnets, a guidance embedding (timestep_cond), a resnet-only scaled mid block, and an odd
    # latent size (9x9: the upsample goes to the skip's 9x9, not 10x10).
    "sd2": dict(
        sample_size=9,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=[4, 8],
        norm_num_groups=8,
        use_linear_projection=True,
        upcast_attention=True,
        resnet_time_scale_shift="scale_shift",
        time_cond_proj_dim=16,
        mid_block_type="UNetMidBlock2D",
        mid_block_scale_factor=1.5,
        flip_sin_to_cos=False,
        freq_shift=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SDXL: text_time addition embedding, transformer_layers_per_block list, linear projections.
    "sdxl": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=(1, 2),
        cross_attention_dim=32,
        attention_head_dim=[2, 4],
        transformer_layers_per_block=[1, 2],
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}


def _torch_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # move every weight off its init (norms at 1/0, any zero init)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(config: dict, batch: int = 2) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    size = config["sample_size"]
    x = {
        "sample": rs.randn(batch, 4, size, size).astype(np.float32),
        "timestep": np.array([7, 981])[:batch],
        "encoder_hidden_states": rs.randn(batch, 5, config["cross_attention_dim"]).astype(
            np.float32
        ),
    }
    if config.get("addition_embed_type") == "text_time":
        x["text_embeds"] = rs.randn(batch, 16).astype(np.float32)
        x["time_ids"] = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1))
    if config.get("time_cond_proj_dim"):
        x["timestep_cond"] = rs.randn(batch, config["time_cond_proj_dim"]).astype(np.float32)
    return x


def _torch_forward(model: UNet2DConditionModel, x: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    features = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: features.append(o[0])) for b in model.down_blocks
    ]
    hooks.append(model.mid_block.register_forward_hook(lambda m, i, o: features.append(o)))
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    added = {k: t[k] for k in ("text_embeds", "time_ids") if k in t} or None
    with torch.no_grad():
        out = model(
            t["sample"],
            t["timestep"],
            t["encoder_hidden_states"],
            added_cond_kwargs=added,
            timestep_cond=t.get("timestep_cond"),
        ).sample
    for h in hooks:
        h.remove()
    return out.numpy(), [f.numpy() for f in features]


def _flax_forward(config: unet.UNetConfig, params, x: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    added = {k: x[k] for k in ("text_embeds", "time_ids") if k in x} or None
    out, features = _jitted_apply(config)(
        {"params": params},
        x["sample"].transpose(0, 2, 3, 1),
        x["timestep"],
        x["encoder_hidden_states"],
        added,
        x.get("timestep_cond"),
    )
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    return nchw(out), [nchw(f) for f in features]


# Cheaper XLA:CPU compiles (the tests are compile-bound); numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _jitted_apply(config: unet.UNetConfig):
    apply = functools.partial(unet.UNet(config).apply, return_features=True)
    return jax.jit(apply, compiler_options=FAST_COMPILE)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    config_dict = CONFIGS[request.param]
    model = _torch_unet(config_dict)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    config = unet.UNetConfig.from_diffusers(dict(model.config))
    params = weights.unet_from_diffusers(state_dict, config)
    x = _inputs(config_dict)
    ref, ref_features = _torch_forward(model, x)
    out, features = _flax_forward(config, params, x)
    return dict(
        name=request.param,
        config_dict=config_dict,
        config=config,
        params=params,
        state_dict=state_dict,
        x=x,
        ref=ref,
        ref_features=ref_features,
        out=out,
        features=features,
    )


def test_forward_matches_diffusers(case):
    assert case["out"].shape == case["ref"].shape
    err = _rel(case["out"], case["ref"])
    assert err < TOL, f"{case['name']}: rel L2 {err:.2e}"
    assert len(case["features"]) == len(case["config"].block_out_channels) + 1
    for i, (f, r) in enumerate(zip(case["features"], case["ref_features"], strict=True)):
        assert f.shape == r.shape, (i, f.shape, r.shape)
        assert _rel(f, r) < TOL, f"{case['name']}: feature {i} rel L2 {_rel(f, r):.2e}"


def test_per_head_attention_matches_diffusers(case):
    """`attention_implementation="per_head"` (the CPU path: one head at a time) gives diffusers'
    output too, for self- and cross-attention."""
    config = dataclasses.replace(case["config"], attention_implementation="per_head")
    out, _ = _flax_forward(config, case["params"], case["x"])
    err = _rel(out, case["ref"])
    assert err < TOL, f"{case['name']}: rel L2 {err:.2e}"


def test_export_loads_strictly_into_diffusers(case):
    exported = weights.unet_to_diffusers(case["params"], case["config"])
    assert set(exported) == set(case["state_dict"])
    fresh = UNet2DConditionModel(**case["config"].to_diffusers()).eval()
    fresh.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True
    )
    out, _ = _torch_forward(fresh, case["x"])
    np.testing.assert_allclose(out, case["ref"], rtol=0, atol=1e-6)


def test_config_round_trip(case):
    config = case["config"]
    assert unet.UNetConfig.from_diffusers(config.to_diffusers()) == config


def test_misshaped_tensor_names_tensor_and_shapes():
    config_dict = CONFIGS["sd1"]
    state_dict = {k: v.numpy() for k, v in _torch_unet(config_dict).state_dict().items()}
    config = unet.UNetConfig.from_diffusers(config_dict)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # (32, 32)
    state_dict[name] = np.zeros((32, 31), np.float32)
    with pytest.raises(weights.WeightsError) as e:
        weights.unet_from_diffusers(state_dict, config)
    assert name in str(e.value) and "(32, 31)" in str(e.value) and "(32, 32)" in str(e.value)


def test_missing_and_unexpected_tensors_raise():
    config_dict = CONFIGS["sd1"]
    state_dict = {k: v.numpy() for k, v in _torch_unet(config_dict).state_dict().items()}
    config = unet.UNetConfig.from_diffusers(config_dict)
    missing = dict(state_dict)
    del missing["conv_norm_out.weight"]
    with pytest.raises(weights.WeightsError, match=r"missing 'conv_norm_out\.weight'"):
        weights.unet_from_diffusers(missing, config)
    extra = dict(state_dict, **{"class_embedding.weight": np.zeros((3, 128), np.float32)})
    with pytest.raises(weights.WeightsError, match=r"unexpected 'class_embedding\.weight'"):
        weights.unet_from_diffusers(extra, config)


def test_conv_projection_checkpoint_loads_into_linear_config():
    """SD1 checkpoints keep 4-D 1x1 proj_in/proj_out; a linear-projection config takes them."""
    config_dict = CONFIGS["sd1"]
    state_dict = {k: v.numpy() for k, v in _torch_unet(config_dict).state_dict().items()}
    name = "down_blocks.0.attentions.0.proj_in.weight"
    assert state_dict[name].shape == (32, 32, 1, 1)
    config = unet.UNetConfig.from_diffusers(config_dict, use_linear_projection=True)
    params = weights.unet_from_diffusers(state_dict, config)
    kernel = params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"]
    np.testing.assert_array_equal(kernel, state_dict[name][:, :, 0, 0].T)


@pytest.mark.parametrize(
    "key,value",
    [
        ("class_embed_type", "timestep"),
        ("time_embedding_type", "fourier"),
        ("dropout", 0.1),
        ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
        ("not_a_key", 1),
    ],
)
def test_from_diffusers_rejects_unsupported(key, value):
    with pytest.raises(ValueError, match=key):
        unet.UNetConfig.from_diffusers(dict(CONFIGS["sd1"], **{key: value}))


def test_sdxl_requires_added_cond_kwargs():
    config = unet.UNetConfig.from_diffusers(CONFIGS["sdxl"])
    inputs = unet.dummy_inputs(config)
    del inputs["added_cond_kwargs"]
    with pytest.raises(ValueError, match="text_embeds"):
        jax.eval_shape(lambda: unet.UNet(config).init(jax.random.key(0), **inputs))


def test_init_params_have_logical_axes():
    config = unet.UNetConfig.from_diffusers(CONFIGS["sd1"])
    boxed = jax.eval_shape(
        lambda: unet.UNet(config).init(jax.random.key(0), **unet.dummy_inputs(config))
    )["params"]
    attn = boxed["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
    assert attn["to_q"]["kernel"].names == ("embed", "heads")
    assert attn["to_out_0"]["kernel"].names == ("heads", "embed")
    assert boxed["conv_in"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "conv_out")


def test_from_pretrained_reads_a_diffusers_pipeline_folder(tmp_path):
    """`save_pretrained` (config.json + safetensors) under `unet/` loads in one call."""
    model = _torch_unet(CONFIGS["sd1"], seed=1)
    model.save_pretrained(tmp_path / "unet", safe_serialization=True)
    config, params = weights.unet_from_pretrained(tmp_path)
    x = _inputs(CONFIGS["sd1"])
    ref, _ = _torch_forward(model, x)
    out, _ = _flax_forward(config, params, x)
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize(
    ("hw", "patches"), [((1, 1), True), ((2, 2), True), ((2, 5), True), ((4, 4), False)]
)
def test_conv_matches_torch_and_uses_patches_only_on_maps_smaller_than_the_kernel(hw, patches):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *hw, 5)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32)
    params = {"params": {"kernel": kernel, "bias": bias}}
    layer = layers.conv(7, 3)
    got = np.asarray(jax.jit(layer.apply)(params, x))
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(kernel).permute(3, 2, 0, 1),
        torch.from_numpy(bias),
        padding=1,
    )
    assert _rel(got, expected.permute(0, 2, 3, 1).numpy()) < 1e-6
    program = str(jax.make_jaxpr(layer.apply)(params, x))
    assert ("conv_general_dilated" not in program) == patches


def test_patch_conv_gradients_and_asymmetric_padding_match_lax():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv_fn, x, kernel):
        y = conv_fn(x, kernel, (1, 1), ((0, 1), (2, 0)), dimension_numbers=dims)
        return (y * np.arange(y.size, dtype=np.float32).reshape(y.shape)).sum(), y

    (_, got), got_grads = jax.value_and_grad(
        functools.partial(loss, layers.conv_general_dilated), (0, 1), has_aux=True
    )(x, kernel)
    (_, want), want_grads = jax.value_and_grad(
        functools.partial(loss, jax.lax.conv_general_dilated), (0, 1), has_aux=True
    )(x, kernel)
    assert got.shape == want.shape == (2, 1, 3, 6)
    for a, b in zip((got, *got_grads), (want, *want_grads), strict=True):
        assert _rel(np.asarray(a), np.asarray(b)) < 1e-6
