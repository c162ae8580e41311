"""Parity of `flash_jax.models.autoencoder.AutoencoderKL` with diffusers `AutoencoderKL` (PyTorch).

Tiny configs with random (perturbed) weights: encoder moments (mean, logvar), decoder output,
scaled-latent helpers, export back with `strict=True`, old attention names.
"""

from __future__ import annotations

import functools

import flax
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from flash_jax import weights
from flash_jax.models import autoencoder

TOL = 1e-4  # relative L2
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

CONFIGS = {
    # SD-like: mid-block attention, quant convs.
    "sd": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    ),
    # Three levels, no mid attention, no quant convs, a shift factor (SD3/Flux-style latents).
    "plain": dict(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=3,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.5,
        shift_factor=0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ),
}


def _torch_vae(config: dict, seed: int = 0) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():  # move every weight off its init (norms at 1/0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731


@functools.cache
def _jitted(config: autoencoder.AutoencoderConfig):
    model = autoencoder.AutoencoderKL(config)
    encode = jax.jit(functools.partial(model.apply, method="encode"), compiler_options=FAST_COMPILE)
    decode = jax.jit(functools.partial(model.apply, method="decode"), compiler_options=FAST_COMPILE)
    return encode, decode


@functools.cache
def _case(name: str) -> dict:
    config_dict = CONFIGS[name]
    model = _torch_vae(config_dict)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    config = autoencoder.AutoencoderConfig.from_diffusers(dict(model.config))
    params = weights.autoencoder_from_diffusers(state_dict, config)
    rs = np.random.RandomState(0)
    # Odd, non-square image: exercises the asymmetric (0, 1, 0, 1) downsample padding.
    images = np.tanh(rs.randn(2, 3, 15, 13)).astype(np.float32)
    latents = rs.randn(2, config.latent_channels, 5, 4).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(torch.from_numpy(latents)).sample
    encode, decode = _jitted(config)
    mean, logvar = encode({"params": params}, nhwc(images))
    out = decode({"params": params}, nhwc(latents))
    return dict(
        name=name,
        config=config,
        params=params,
        state_dict=state_dict,
        model=model,
        images=images,
        latents=latents,
        ref_mean=dist.mean.numpy(),
        ref_logvar=dist.logvar.numpy(),
        ref_decoded=decoded.numpy(),
        mean=nchw(mean),
        logvar=nchw(logvar),
        decoded=nchw(out),
    )


@pytest.fixture(params=list(CONFIGS))
def case(request):
    return _case(request.param)


def test_encode_matches_diffusers(case):
    assert case["mean"].shape == case["ref_mean"].shape
    assert _rel(case["mean"], case["ref_mean"]) < TOL
    assert _rel(case["logvar"], case["ref_logvar"]) < TOL


def test_decode_matches_diffusers(case):
    assert case["decoded"].shape == case["ref_decoded"].shape
    assert _rel(case["decoded"], case["ref_decoded"]) < TOL


def test_scaled_latent_helpers():
    case = _case("plain")  # the config with a shift factor; one config keeps compiles down
    config, params = case["config"], case["params"]
    key = jax.random.key(3)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def helpers(params, images, latents):
        return (
            autoencoder.images_to_latents(params, config, images),
            autoencoder.images_to_latents(params, config, images, key),
            autoencoder.latents_to_images(params, config, latents),
        )

    mean_latents, sampled, images = helpers(params, nhwc(case["images"]), nhwc(case["latents"]))
    shift = config.shift_factor or 0.0
    expected = (case["ref_mean"] - shift) * config.scaling_factor
    assert _rel(nchw(mean_latents), expected) < TOL
    eps = nchw(jax.random.normal(key, mean_latents.shape))
    std = np.exp(0.5 * case["ref_logvar"])
    assert _rel(nchw(sampled), (case["ref_mean"] + std * eps - shift) * config.scaling_factor) < TOL
    with torch.no_grad():
        z = torch.from_numpy(case["latents"]) / config.scaling_factor + shift
        ref = case["model"].decode(z).sample.numpy()
    assert _rel(nchw(images), ref) < TOL


def test_export_loads_strictly_into_diffusers(case):
    exported = weights.autoencoder_to_diffusers(case["params"], case["config"])
    assert set(exported) == set(case["state_dict"])
    fresh = TorchAutoencoderKL(**case["config"].to_diffusers()).eval()
    fresh.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True
    )
    with torch.no_grad():
        decoded = fresh.decode(torch.from_numpy(case["latents"])).sample.numpy()
    np.testing.assert_allclose(decoded, case["ref_decoded"], rtol=0, atol=1e-6)


def test_config_round_trip(case):
    config = case["config"]
    assert autoencoder.AutoencoderConfig.from_diffusers(config.to_diffusers()) == config


def test_old_attention_names_and_conv_layouts_load():
    """Pre-0.14 diffusers VAEs: `query/key/value/proj_attn`, sometimes as 1x1 conv weights."""
    state_dict = {k: v.numpy() for k, v in _torch_vae(CONFIGS["sd"]).state_dict().items()}
    config = autoencoder.AutoencoderConfig.from_diffusers(CONFIGS["sd"])
    new = weights.autoencoder_from_diffusers(state_dict, config)
    old = {}
    for name, value in state_dict.items():
        for new_name, old_name in (
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ):
            if f"attentions.0.{new_name}." in name:
                name = name.replace(f".{new_name}.", f".{old_name}.")
                value = value[..., None, None] if value.ndim == 2 else value
        old[name] = value
    assert "encoder.mid_block.attentions.0.query.weight" in old
    loaded = weights.autoencoder_from_diffusers(old, config)
    jax.tree.map(np.testing.assert_array_equal, loaded, new)


def test_misshaped_missing_unexpected_raise():
    state_dict = {k: v.numpy() for k, v in _torch_vae(CONFIGS["sd"]).state_dict().items()}
    config = autoencoder.AutoencoderConfig.from_diffusers(CONFIGS["sd"])
    bad = dict(state_dict, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(weights.WeightsError) as e:
        weights.autoencoder_from_diffusers(bad, config)
    assert "quant_conv.weight" in str(e.value) and "(8, 8, 3, 3)" in str(e.value)
    assert "(1, 1, 8, 8)" in str(e.value)  # the model's (flax-layout) shape
    missing = {k: v for k, v in state_dict.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(weights.WeightsError, match=r"missing 'decoder\.conv_out\.bias'"):
        weights.autoencoder_from_diffusers(missing, config)
    extra = dict(state_dict, **{"encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(weights.WeightsError, match=r"unexpected 'encoder\.extra\.weight'"):
        weights.autoencoder_from_diffusers(extra, config)


@pytest.mark.parametrize(
    "key,value",
    [
        ("act_fn", "relu"),
        ("latents_mean", [0.0] * 4),
        ("down_block_types", ["AttnDownEncoderBlock2D"]),
        ("bogus", 1),
    ],
)
def test_from_diffusers_rejects_unsupported(key, value):
    with pytest.raises(ValueError, match=key):
        autoencoder.AutoencoderConfig.from_diffusers(dict(CONFIGS["sd"], **{key: value}))


def test_from_pretrained_reads_a_diffusers_pipeline_folder(tmp_path):
    """`save_pretrained` (config.json + safetensors) under `vae/` loads in one call."""
    case = _case(next(iter(CONFIGS)))
    case["model"].save_pretrained(tmp_path / "vae", safe_serialization=True)
    config, params = weights.autoencoder_from_pretrained(tmp_path)
    assert config == case["config"]
    for path, leaf in flax.traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(leaf, flax.traverse_util.flatten_dict(case["params"])[path])
