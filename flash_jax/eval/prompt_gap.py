"""Does a trained teacher use its prompt? Its diffusion loss with the true, a wrong and no caption.

  python -m flash_jax.eval.prompt_gap --workdir runs/shapes/teacher [--n 128] [--field params]

On N eval images, at fixed timesteps and with the same noise, the teacher's loss (ε-, v- or x0-MSE,
its own prediction type) given each image's own caption, another image's caption (the batch
rolled by one) and the empty prompt. A teacher that binds its text predicts worse with the wrong
caption: the relative gap `wrong / true − 1` is the cheapest check that the conditioning was learnt,
long before its samples can be judged (docs/results.md, "Teacher").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flash_jax import diffusion
from flash_jax.config import read_json
from flash_jax.methods import denoising
from flash_jax.t2i import T2I

TIMESTEPS = (50, 200, 400, 600, 800, 950)


def losses_by_prompt(
    model: T2I,
    params: dict[str, Any],
    latents: jax.Array,
    prompts: dict[str, jax.Array],
    timesteps: Sequence[int],
    key: jax.Array,
) -> dict[int, dict[str, float]]:
    """{t: {prompt name: mean loss}} for clean `latents` `(B, h, w, c)` and each entry of `prompts`
    (token ids `(B, L)`); every prompt sees the same noise at a given t."""

    @jax.jit
    def loss(tokens, t, noise):
        context = model.encode_text(params["text"], tokens)
        alpha, sigma = (a.reshape(-1, 1, 1, 1) for a in model.schedule.alpha_sigma(t))
        x_t = diffusion.add_noise(latents, noise, alpha, sigma)
        out = model.apply_unet(params["unet"], x_t, t.astype(jnp.float32), context)
        target = denoising.diffusion_target(
            latents, noise, alpha, sigma, model.schedule.prediction_type
        )
        return jnp.mean((out - target) ** 2)

    rows = {}
    for t, k in zip(timesteps, jax.random.split(key, len(timesteps)), strict=True):
        noise = jax.random.normal(k, latents.shape)
        t_batch = jnp.full((latents.shape[0],), t, jnp.int32)
        rows[int(t)] = {name: float(loss(tok, t_batch, noise)) for name, tok in prompts.items()}
    return rows


def prompt_gap(rows: dict[int, dict[str, float]]) -> float:
    """Mean over t of `wrong / true − 1`."""
    return float(np.mean([r["wrong caption"] / r["true caption"] - 1.0 for r in rows.values()]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the teacher's run directory")
    parser.add_argument("--n", type=int, default=128, help="eval images")
    parser.add_argument("--field", default="ema_params", help="ema_params | params")
    args = parser.parse_args(argv)

    from flash_jax.eval import judge
    from flash_jax.train import checkpoint

    run = ml_collections.ConfigDict(read_json(Path(args.workdir) / "config.json"))
    model = T2I.from_config(run)
    params = checkpoint.load_params(args.workdir, args.field)
    vae = checkpoint.load_params(run.autoencoder_workdir)
    images, labels = judge.real_examples("eval", args.n, run.data.seed, run.data.image_size)
    tokenize = model.tokenizer()
    tokens = jnp.asarray(tokenize([str(c) for c in labels["caption"]]))
    prompts = {
        "true caption": tokens,
        "wrong caption": jnp.roll(tokens, 1, axis=0),
        "empty prompt": jnp.asarray(tokenize([""] * args.n)),
    }
    latents = model.to_latents(vae, jnp.asarray(images))
    rows = losses_by_prompt(model, params, latents, prompts, TIMESTEPS, jax.random.PRNGKey(0))
    print("| t | " + " | ".join(prompts) + " |\n|---|" + "---|" * len(prompts))
    for t, r in rows.items():
        print(f"| {t} | " + " | ".join(f"{v:.4f}" for v in r.values()) + " |")
    print(f"prompt gap (wrong / true − 1, mean over t): {prompt_gap(rows):.4f}")


if __name__ == "__main__":
    main()
