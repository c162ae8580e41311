"""The prompt-gap diagnostic: zero for a UNet that cannot see the text, non-zero when it can."""

import flax
import jax
import jax.numpy as jnp

from configs.shapes import teacher as teacher_config
from flash_jax.eval import prompt_gap
from flash_jax.t2i import T2I


def test_gap_is_zero_exactly_when_cross_attention_is_cut():
    config = teacher_config.get_config("tiny")
    model = T2I.from_config(config)
    params = model.init(jax.random.PRNGKey(0))
    tokenize = model.tokenizer()
    tokens = jnp.asarray(tokenize(["a red circle", "two blue stars", "a dotted square"]))
    prompts = {"true caption": tokens, "wrong caption": jnp.roll(tokens, 1, axis=0)}
    latents = jax.random.normal(jax.random.PRNGKey(1), model.latent_shape(3, 16))
    key = jax.random.PRNGKey(2)

    rows = prompt_gap.losses_by_prompt(model, params, latents, prompts, (100, 900), key)
    assert abs(prompt_gap.prompt_gap(rows)) > 1e-6

    flat = flax.traverse_util.flatten_dict(params["unet"], sep="/")
    cut = {k: jnp.zeros_like(v) if "attn2/to_out_0/kernel" in k else v for k, v in flat.items()}
    assert any("attn2/to_out_0/kernel" in k for k in flat)
    blind = dict(params, unet=flax.traverse_util.unflatten_dict(cut, sep="/"))
    rows = prompt_gap.losses_by_prompt(model, blind, latents, prompts, (100, 900), key)
    for r in rows.values():
        assert r["wrong caption"] == r["true caption"]
