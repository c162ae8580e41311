"""Pieces several methods share (this module is not a method: `config.method=common` is an error).

- `frozen_loaders`, `conditioning`: the frozen teacher and VAE, and a batch's prompt embeddings
  (cached ones when the batch carries them, `t2i.T2I.conditioning`) with the empty prompt's.
- `alpha_sigma`, `x0_eps_from_output`, `predict_x0`: a network's clean estimate at integer
  timesteps.
- `LatentDiscriminator`: the LADD-style discriminator over the frozen teacher UNet's features
  (docs/method.md, "Adversarial term"), shared by Imagine Flash and ADD: logits, abstract
  initialisation, hinge losses with an optional R1 penalty; `discriminator_fns`, the Method entries built on it.
- Guidance-conditioned students (LCM, guided step distillation): `with_guidance_input` (the UNet
  also reads the guidance weight w through diffusers' `timestep_cond`), `student_from_teacher`
  (the teacher's weights, the new guidance projection at zero) and `guided_apply`.
- `maybe_lora`: the method as a LoRA student on the frozen teacher when `config.lora.enabled`.
- `student_generate`, `grid_sample`: `Method.generate` / `Method.sample` of a student sampled like
  a plain diffusion model; `student_method`, the whole Method of such a student (ADD, Imagine
  Flash), with the discriminator entries when it has one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import diffusion, frozen, lora, sampling, t2i, weights
from flash_jax.methods import Method
from flash_jax.models import discriminator as disc_lib
from flash_jax.models import layers, unet
from flash_jax.t2i import T2I

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections

Array = jax.Array


def frozen_loaders(
    config: ml_collections.ConfigDict, model: T2I
) -> tuple[Callable[[], dict[str, Any]], Callable[[], dict[str, Any]]]:
    """`(load_teacher, load_frozen)`: the frozen teacher `{"unet", "text"}` and
    `{"teacher": ..., "vae": ...}` (`frozen.load_teacher` / `load_autoencoder`), memoised: a
    method's init, discriminator init and load_frozen all need the teacher (GBs at SD scale)."""
    load_teacher = functools.cache(lambda: frozen.load_teacher(config, model))
    load_vae = functools.cache(lambda: frozen.load_autoencoder(config, model))

    def load_frozen() -> dict[str, Any]:
        return {"teacher": load_teacher(), "vae": load_vae()}

    return load_teacher, load_frozen


def conditioning(
    model: T2I, text_params: Any, batch: Mapping[str, Array], empty_tokens: Array
) -> tuple[Any, Array, Any]:
    """`(context, pooled (B, P), uncond)` of a batch: the prompts' UNet context (its cached
    embeddings when present, else its `tokens` encoded), their pooled embedding, and the empty
    prompt's context (the CFG unconditional branch, encoded once and broadcast to B)."""
    context, pooled = model.conditioning(text_params, batch)
    b = batch["tokens"].shape[0]
    uncond, _ = model.uncond_conditioning(text_params, jnp.asarray(empty_tokens), b)
    return context, pooled, uncond


def alpha_sigma(schedule: diffusion.Schedule, t: Array) -> tuple[Array, Array]:
    """α_t, σ_t at integer timesteps `t` `(B,)`, shaped `(B, 1, 1, 1)` for NHWC latents."""
    return tuple(v.reshape((*v.shape, 1, 1, 1)) for v in schedule.alpha_sigma(t))


def predict_x0(
    model: T2I,
    apply_fn: sampling.ApplyFn,
    unet_params: Any,
    x_t: Array,
    t: Array,
    cond: Any,
) -> tuple[Array, Array]:
    """`(x̂0, ε̂)` of `apply_fn(unet_params, x_t, t, cond)` at integer timesteps `t` `(B,)`."""
    out = apply_fn(unet_params, x_t, t.astype(jnp.float32), cond)
    return x0_eps_from_output(model, out, x_t, t)


def x0_eps_from_output(model: T2I, out: Array, x_t: Array, t: Array) -> tuple[Array, Array]:
    """`(x̂0, ε̂)` from a network's raw output `out` at latents `x_t` `(B, h, w, c)` and integer
    timesteps `t` `(B,)`, per the schedule's prediction type."""
    alpha, sigma = alpha_sigma(model.schedule, t)
    return diffusion.predict_x0_eps(out, x_t, alpha, sigma, model.schedule.prediction_type)


# ------------------------------------------------------------------------ latent discriminator


@dataclasses.dataclass(frozen=True)
class LatentDiscriminator:
    """Trainable heads (models/discriminator.py) over the frozen teacher UNet's down/mid features
    of a clean latent re-noised to a random level `t_d ~ U[0, t_max)`; conditioned on t_d and the
    pooled prompt. Hinge loss; `r1_weight > 0` adds `r1_weight·E‖∇_x D(x_real)‖²` (the gradient
    with respect to the real latents, through the frozen features). `weight` is λ_adv, the
    generator term's weight in the student's loss (0: no adversarial term, no discriminator)."""

    model: T2I
    width: int = 64
    t_max: int = 750
    r1_weight: float = 0.0
    weight: float = 0.0

    @property
    def active(self) -> bool:
        return self.weight > 0

    @property
    def heads(self) -> disc_lib.Discriminator:
        return disc_lib.Discriminator(width=self.width)

    def logits(
        self,
        disc_params: Any,
        teacher_unet: Any,
        x0: Array,
        context: Array,
        pooled: Array,
        rng: Array,
    ) -> Array:
        """D of clean latents `x0` `(B, h, w, c)`, re-noised with `rng`: logits `(B,)`."""
        k_t, k_eps = jax.random.split(rng)
        b = x0.shape[0]
        t_d = jax.random.randint(k_t, (b,), 0, self.t_max)
        a, s = alpha_sigma(self.model.schedule, t_d)
        noisy = diffusion.add_noise(x0, jax.random.normal(k_eps, x0.shape), a, s)
        _, features = self.model.apply_unet(
            teacher_unet, noisy, t_d.astype(jnp.float32), context, return_features=True
        )
        return self.heads.apply({"params": disc_params}, features, t_d, pooled)

    def init(self, rng: Array, image_size: int, empty_tokens: Array) -> Any:
        """Fresh head parameters. Only the SHAPES of the teacher's features (at `image_size`) and
        of the pooled text embedding (of `empty_tokens`, the tokenizer's ids of "") matter: found abstractly, so neither reading the teacher nor
        running it becomes part of the (sharded, jitted) init."""

        def teacher_outputs(teacher):
            x = jnp.zeros(self.model.latent_shape(1, image_size))
            tokens = jnp.asarray(empty_tokens)[None]
            context, pooled = self.model.encode_text_pooled(teacher["text"], tokens)
            _, features = self.model.apply_unet(
                teacher["unet"], x, jnp.zeros((1,)), context, return_features=True
            )
            return features, pooled

        abstract_teacher = jax.eval_shape(self.model.init, jax.random.PRNGKey(0))
        features, pooled = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(teacher_outputs, abstract_teacher),
        )
        return self.heads.init(rng, features, jnp.zeros((1,)), pooled)["params"]

    def generator_loss(
        self,
        disc_params: Any,
        teacher_unet: Any,
        x0: Array,
        context: Array,
        pooled: Array,
        rng: Array,
    ) -> tuple[Array, dict[str, Array]]:
        """The generator's hinge term on its clean estimates `x0` `(B, h, w, c)`, and the aux
        entries the trainer's discriminator update reads (`fake`: `x0`)."""
        logits = self.logits(disc_params, teacher_unet, x0, context, pooled, rng)
        adv = disc_lib.hinge_generator_loss(logits)
        return adv, {"adv": adv, "fake": x0}

    def add_generator_term(
        self,
        loss: Array,
        aux: dict[str, Array],
        disc_params: Any,
        teacher_unet: Any,
        x0: Array,
        context: Array,
        pooled: Array,
        rng: Array,
    ) -> tuple[Array, dict[str, Array]]:
        """`(loss + weight·generator term, aux | its entries)` of a student's loss; unchanged
        when the discriminator is not `active`."""
        if not self.active:
            return loss, aux
        adv, adv_aux = self.generator_loss(disc_params, teacher_unet, x0, context, pooled, rng)
        return loss + self.weight * adv, aux | adv_aux

    def loss(
        self,
        disc_params: Any,
        teacher_unet: Any,
        real: Array,
        fake: Array,
        context: Array,
        pooled: Array,
        real_rng: Array,
        fake_rng: Array,
    ) -> tuple[Array, dict[str, Array]]:
        """Hinge loss (+ R1) of real and fake clean latents; aux: mean logits (and `r1`)."""

        def real_logits_fn(x):
            return self.logits(disc_params, teacher_unet, x, context, pooled, real_rng)

        real_logits = real_logits_fn(real)
        fake_logits = self.logits(disc_params, teacher_unet, fake, context, pooled, fake_rng)
        loss = disc_lib.hinge_discriminator_loss(real_logits, fake_logits)
        aux = {"real": jnp.mean(real_logits), "fake": jnp.mean(fake_logits)}
        if self.r1_weight > 0:
            grad = jax.grad(lambda x: jnp.sum(real_logits_fn(x)))(real)
            r1 = jnp.mean(jnp.sum(grad**2, axis=tuple(range(1, grad.ndim))))
            loss = loss + self.r1_weight * r1
            aux["r1"] = r1
        return loss, aux


def discriminator_fns(
    model: T2I, discriminator: LatentDiscriminator, image_size: int, empty_tokens: Array
) -> tuple[Callable[[Array], Any], Callable[..., tuple[Array, dict[str, Array]]]]:
    """`(Method.init_discriminator, Method.discriminator_loss)` of a student distilled from a
    frozen `{"teacher": {"unet", "text"}, "vae"}`: real = the batch's latents, fake = the
    generator's `fake` aux, both seen through the teacher's features."""

    def init_discriminator(rng: Array) -> Any:
        return discriminator.init(rng, image_size, empty_tokens)

    def discriminator_loss(disc_params, fake, frozen, batch, rng):
        k_real, k_fake, k_lat = jax.random.split(rng, 3)
        context, pooled, _ = conditioning(model, frozen["teacher"]["text"], batch, empty_tokens)
        real = model.batch_latents(frozen["vae"], batch, k_lat)
        teacher_unet = frozen["teacher"]["unet"]
        return discriminator.loss(
            disc_params, teacher_unet, real, fake, context, pooled, k_real, k_fake
        )

    return init_discriminator, discriminator_loss


# ------------------------------------------------------------------ guidance-conditioned students


def with_guidance_input(model: T2I, dim: int) -> T2I:
    """`model` whose UNet also reads a guidance embedding of width `dim` (`time_cond_proj_dim`)."""
    if dim < 2:
        raise ValueError(f"guidance embedding width {dim} must be >= 2")
    return dataclasses.replace(model, unet=dataclasses.replace(model.unet, time_cond_proj_dim=dim))


def student_from_teacher(student_model: T2I, teacher_unet: Any) -> Any:
    """The teacher's UNet params in the student's structure: every tensor the teacher has, and
    zeros for the ones it lacks (the guidance projection `time_embedding/cond_proj`), so the
    student starts as the conditional teacher whatever w it is given."""
    expected = jax.eval_shape(
        lambda k: unet.init_params(student_model.unet, k), jax.random.PRNGKey(0)
    )
    flat_teacher = flax.traverse_util.flatten_dict(teacher_unet)
    flat_expected = flax.traverse_util.flatten_dict(expected)
    unused = sorted("/".join(k) for k in set(flat_teacher) - set(flat_expected))
    if unused:
        raise ValueError(f"teacher UNet tensors the student does not have: {unused[:5]}")
    student = {k: flat_teacher.get(k, np.zeros(v.shape, v.dtype)) for k, v in flat_expected.items()}
    student = flax.traverse_util.unflatten_dict(student)
    weights.check_params_match(student, expected, "student from teacher")
    return student


def guided_apply(model: T2I) -> sampling.ApplyFn:
    """`apply_fn(unet_params, x, t, cond)` of a guidance-conditioned UNet, with
    `cond = {"context": the UNet context, "w": (B,)}` (w: the CFG weight, scale − 1)."""
    dim = model.unet.time_cond_proj_dim
    if dim is None:
        raise ValueError("guided_apply needs a model from with_guidance_input")

    def apply(unet_params: Any, x: Array, t: Array, cond: dict) -> Array:
        emb = layers.guidance_embedding(cond["w"], dim)
        return model.apply_unet(unet_params, x, t, cond["context"], timestep_cond=emb)

    return apply


# ------------------------------------------------------------------------------------ LoRA


def maybe_lora(
    method: Method, config: ml_collections.ConfigDict, students: Mapping[str, T2I], base: T2I
) -> Method:
    """`method` as a LoRA student (flash_jax/lora.py) when `config.lora.enabled`, else unchanged:
    `students` maps each trainable UNet's params key to the model it has (LCM: `{"unet",
    "target"}`), `base` is the model of the frozen `teacher` UNet the factors are added to."""

    def abstract(m: T2I) -> Any:
        return weights.model_abstract("unet", m.unet)

    return lora.maybe_adapt(
        method,
        config,
        lambda: {k: abstract(m) for k, m in students.items()},
        lambda: abstract(base),
    )


# ------------------------------------------------------------------------------------ sampling


def student_generate(
    model: T2I, sampler: sampling.SamplerConfig, empty_tokens: Array
) -> Callable[..., Array]:
    """`Method.generate` of a student UNet sampled like a plain diffusion model (`sampler` at the
    requested step count) with the frozen teacher's text encoder: `params = {"unet"}`,
    `frozen = {"teacher": {"text", ...}, "vae"}`."""

    def generate(params, frozen, tokens, x_T, rng, num_steps: int):
        student = {"unet": params["unet"], "text": frozen["teacher"]["text"]}
        uncond = jnp.broadcast_to(empty_tokens, tokens.shape)
        steps_cfg = dataclasses.replace(sampler, num_steps=num_steps)
        return model.generate(student, frozen["vae"], tokens, uncond, x_T, steps_cfg, rng)

    return generate


def grid_sample(model: T2I, generate: Callable[..., Array], num_steps: int) -> Callable[..., Array]:
    """`Method.sample` (periodic grids) from `generate` at `num_steps` steps: initial noise
    shaped like the batch's latents (raw or cached) drawn from `rng`, sampler noise from
    `fold_in(rng, 1)`."""

    def sample(params, frozen, batch, rng):
        x_T = jax.random.normal(rng, model.batch_latent_shape(batch))
        return generate(params, frozen, batch["tokens"], x_T, jax.random.fold_in(rng, 1), num_steps)

    return sample


def student_method(
    model: T2I,
    sampler: sampling.SamplerConfig,
    discriminator: LatentDiscriminator,
    image_size: int,
    *,
    init: Callable[[Array], Any],
    load_frozen: Callable[[], dict[str, Any]],
    generator_loss: Callable[..., tuple[Array, dict[str, Array]]],
) -> Method:
    """The Method of a UNet student of the frozen teacher sampled with `sampler`
    (`student_generate`, `grid_sample`), with `discriminator_fns` when `discriminator` is
    active."""
    tokenizer = model.tokenizer()
    empty_tokens = tokenizer([""])[0]
    init_discriminator, discriminator_loss = (
        discriminator_fns(model, discriminator, image_size, empty_tokens)
        if discriminator.active
        else (None, None)
    )
    generate = student_generate(model, sampler, empty_tokens)
    return Method(
        init=init,
        load_frozen=load_frozen,
        generator_loss=generator_loss,
        prepare_batch=functools.partial(t2i.prepare_batch, tokenizer=tokenizer, model=model),
        init_discriminator=init_discriminator,
        discriminator_loss=discriminator_loss,
        sample=grid_sample(model, generate, sampler.num_steps),
        generate=generate,
        logical_axes=model.logical_axes,
    )
