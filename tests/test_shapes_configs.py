"""The testbed configs (configs/shapes): variants are checked and reach the model, and the shipped
autoencoders (assets/shapes) fit the configs that name them: every tensor matches the config's
model, and the config's latent factors fit the weights (the diffusion latents of training images
are zero-mean with unit variance). A mismatch is refused, naming the tensors. Each shipped teacher
belongs to its own autoencoder's latents (their UNets have the same shapes, so only what they
predict can tell them apart).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.shapes import teacher
from flash_jax import diffusion, frozen, methods, weights
from flash_jax.eval import judge
from flash_jax.methods import common as method_common
from flash_jax.models import autoencoder
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "shapes"
SHIPPED = {"f4": "autoencoder.msgpack", "f2": "autoencoder_f2.msgpack"}
TEACHERS = {"f4": "teacher.msgpack", "f2": "teacher_f2.msgpack"}
CONFIGS = ("add", "autoencoder", "imagine_flash", "judge", "lcm", "step_distill", "teacher")
DIFFUSION = ("add", "imagine_flash", "lcm", "step_distill", "teacher")


@pytest.mark.parametrize("name", CONFIGS)
def test_misspelt_variant_is_refused(name):
    get_config = importlib.import_module(f"configs.shapes.{name}").get_config
    with pytest.raises(ValueError, match=rf"{name}\.py: unknown variant\(s\) \['tiyn'\]"):
        get_config("quick,tiyn")


@pytest.mark.parametrize("name", DIFFUSION)
def test_f2_variant_puts_every_diffusion_config_on_16x16_latents(name):
    get_config = importlib.import_module(f"configs.shapes.{name}").get_config
    f4, f2 = get_config(""), get_config("f2")
    assert (f4.model.unet.sample_size, f2.model.unet.sample_size) == (8, 16)
    assert f2.model.autoencoder.to_dict() == teacher.get_config("f2").model.autoencoder.to_dict()
    assert f2.model.autoencoder.block_out_channels == [16, 32]


def _config(latents: str, asset: str):
    config = teacher.get_config("f2" if latents == "f2" else "")
    config.autoencoder_workdir = str(ASSETS / asset)
    return config


@pytest.mark.parametrize("latents", sorted(SHIPPED))
def test_shipped_autoencoder_fits_its_config(latents):
    config = _config(latents, SHIPPED[latents])
    model = T2I.from_config(config)
    params = frozen.load_autoencoder(config, model)  # raises on any mismatched tensor
    images, _ = judge.real_examples("train", 128, config.data.seed, config.data.image_size)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    latents_ = jax.jit(autoencoder.images_to_latents, static_argnums=1)(
        params, model.autoencoder, x
    )
    side = config.data.image_size // 2 ** (len(config.model.autoencoder.block_out_channels) - 1)
    assert latents_.shape == (128, side, side, 4)
    assert config.model.unet.sample_size == side
    np.testing.assert_allclose(float(latents_.mean()), 0.0, atol=0.05)
    np.testing.assert_allclose(float(latents_.std()), 1.0, atol=0.05)


@pytest.mark.parametrize(
    "latents, asset, problem",
    [("f2", SHIPPED["f4"], "unexpected"), ("f4", SHIPPED["f2"], "missing")],
)
def test_autoencoder_of_another_latent_space_is_refused(latents, asset, problem):
    config = _config(latents, asset)
    with pytest.raises(weights.WeightsError, match=rf"{asset}[\s\S]*{problem} \S*down_blocks"):
        frozen.load_autoencoder(config, T2I.from_config(config))


def _epsilon_errors(latents: str) -> dict[str, float]:
    """Mean squared ε-prediction error of each shipped teacher on the `latents` diffusion latents
    of 64 training images with their captions, at the same 64 timesteps spread over [50, 950]
    and the same noise."""
    config = _config(latents, SHIPPED[latents])
    model = T2I.from_config(config)
    images, labels = judge.real_examples("train", 64, config.data.seed, config.data.image_size)
    x0 = model.to_latents(frozen.load_autoencoder(config, model), jnp.asarray(images))
    t = jnp.linspace(50, 950, 64).astype(jnp.int32)
    alpha, sigma = method_common.alpha_sigma(model.schedule, t)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = diffusion.add_noise(x0, noise, alpha, sigma)
    tokens = jnp.asarray(model.tokenizer()(list(labels["caption"])))

    @jax.jit
    def error(params):
        context = model.encode_text(params["text"], tokens)
        eps = model.apply_unet(params["unet"], x_t, t, context)
        return jnp.mean((eps - noise) ** 2)

    return {name: float(error(checkpoint.load_params(ASSETS / a))) for name, a in TEACHERS.items()}


@pytest.mark.parametrize("latents", sorted(SHIPPED))
def test_shipped_teacher_belongs_to_its_autoencoder(latents):
    errors = _epsilon_errors(latents)
    other = next(name for name in TEACHERS if name != latents)
    assert errors[latents] < 0.1, errors  # a trained denoiser (an untrained one is near 1)
    assert errors[latents] < 0.5 * errors[other], errors


def test_leak_variant_leaks_like_sd15_at_t_T():
    """The 'leak' teacher's terminal ᾱ_T is what terminal_leak measured the 16x16 latents need to
    keep SD1.5's low-frequency SNR at t = T (within 3 %); it continues the shipped f2 teacher."""
    config = teacher.get_config("f2,leak")
    leak = json.loads((ROOT / "benchmarks" / "results" / "terminal_leak.json").read_text())
    want = leak["rows"]["testbed 16x16 (f2)"]["alpha_bar_T_to_match_sd"]
    got = diffusion.make_schedule(**config.schedule.to_dict()).alphas_cumprod[-1]
    assert got == pytest.approx(want, rel=0.03)
    assert config.init_from == "assets/shapes/teacher_f2.msgpack"
    with pytest.raises(ValueError, match="'leak' variant is for 'f2' latents"):
        teacher.get_config("leak")


def test_teacher_init_from_starts_from_the_file_and_refuses_another_model(tiny_assets):
    config = teacher.get_config("tiny")
    with config.unlocked():
        config.init_from = str(tiny_assets / "teacher.msgpack")
        config.autoencoder_workdir = str(tiny_assets / "autoencoder.msgpack")
    init = methods.get("denoising")(config).init
    got = init(jax.random.PRNGKey(7))
    want = checkpoint.load_params(tiny_assets / "teacher.msgpack")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got, want))
    with config.unlocked():
        config.init_from = str(tiny_assets / "judge.msgpack")
    with pytest.raises(
        ValueError, match=r"config.init_from=.*judge.msgpack has no \['text', 'unet'\]"
    ):
        methods.get("denoising")(config).init(jax.random.PRNGKey(0))
