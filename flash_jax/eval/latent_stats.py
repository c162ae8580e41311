"""Statistics of a trained autoencoder's latents: what `scaling_factor` / `shift_factor` should be.

  python -m flash_jax.eval.latent_stats --workdir runs/shapes/autoencoder [--n 256]

Prints the mean and std of the posterior means over N training images and the factors that make
the diffusion latents `(z − shift)·scale` zero-mean with unit variance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from flash_jax.config import read_json
from flash_jax.eval import judge
from flash_jax.models import autoencoder
from flash_jax.train import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the autoencoder's run directory")
    parser.add_argument("--n", type=int, default=256, help="training images")
    args = parser.parse_args()
    run = read_json(Path(args.workdir) / "config.json")
    config = autoencoder.AutoencoderConfig.from_diffusers(run["model"]["autoencoder"])
    params = checkpoint.load_params(args.workdir)
    images, _ = judge.real_examples("train", args.n, run["data"]["seed"], run["data"]["image_size"])
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    mean, logvar = jax.jit(lambda p, x: autoencoder.encode(p, config, x))(params, x)
    mu, std = float(mean.mean()), float(mean.std())
    print(
        f"posterior means: mean {mu:.3f}, std {std:.3f}; posterior std {float(jnp.exp(0.5 * logvar).mean()):.4f}"
    )
    print(f"-> shift_factor={mu:.2f}, scaling_factor=1/{std:.2f}={1 / std:.4f}")


if __name__ == "__main__":
    main()
