"""The testbed configs (configs/shapes): variants are checked and reach the model, and the shipped
autoencoders (assets/shapes) fit the configs that name them: every tensor matches the config's
model, and the config's latent factors fit the weights (the diffusion latents of training images
are zero-mean with unit variance). A mismatch is refused, naming the tensors.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.shapes import teacher
from flash_jax import pipeline, weights
from flash_jax.eval import judge
from flash_jax.models import autoencoder
from flash_jax.pipeline import T2I

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes"
SHIPPED = {"f4": "autoencoder.msgpack", "f2": "autoencoder_f2.msgpack"}
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
    params = pipeline.load_autoencoder(config, model)  # raises on any mismatched tensor
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
        pipeline.load_autoencoder(config, T2I.from_config(config))
