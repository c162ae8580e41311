"""Adversarial diffusion distillation (ADD, Sauer et al. 2023; docs/method.md, "Baselines"): the
4-step baseline.

One generator step:

  s ~ U{student timesteps}: the trailing grid of `student_steps` (4: 999, 749, 499, 249)
  x_s = α_s·x0 + σ_s·ε                           forward-noised REAL latents (leaky, unlike Imagine
                                                 Flash's backward rollout)
  x̂θ = x̂0(x_s, ε̂_θ(x_s, s), s)                   the only gradient path
  t ~ U{0..T−1}; x̂θ_t = α_t·sg(x̂θ) + σ_t·ε'     re-noised student output
  x̂ψ = sg(teacher's guided x̂0 at (x̂θ_t, t))      one CFG call of the frozen teacher
  L_distill = E[c(t)·‖x̂θ − x̂ψ‖²], c(t) = α_t
  L = adv_weight·L_adv^G + distill_weight·L_distill     (λ = distill_weight = 2.5 in the paper)

It is SRL's closest relative without the shift γ, without the k-step solve and with forward inputs.
The discriminator is Imagine Flash's (`common.LatentDiscriminator`: trainable heads on the frozen
teacher's features, hinge loss) plus the paper's R1 penalty (`r1_weight`). Sampling uses
`config.sample` (default: DDIM η = 1 on trailing steps, the ancestral sampler SDXL-Turbo ships with).

config reads: model.*, schedule.*, teacher_workdir, autoencoder_workdir (or model.pretrained),
sample.* and `add.*` (configs/shapes/add.py documents every knob). Batches may carry cached latents
and text embeddings (flash_jax/data/cache.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from flash_jax import diffusion, sampling
from flash_jax.methods import Method, common
from flash_jax.t2i import T2I

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ADDConfig:
    """`config.add` (configs/shapes/add.py documents every field)."""

    student_steps: int = 4
    guidance_scale: float = 4.0
    distill_weight: float = 2.5
    adv_weight: float = 1.0
    disc_width: int = 64
    disc_t_max: int = 750
    r1_weight: float = 1e-5

    def __post_init__(self):
        if self.student_steps < 1:
            raise ValueError(f"add.student_steps={self.student_steps} must be >= 1")
        if self.distill_weight < 0 or self.adv_weight < 0:
            raise ValueError(
                f"add.distill_weight={self.distill_weight}, add.adv_weight={self.adv_weight}: "
                "weights must be >= 0"
            )


def distillation_loss(
    model: T2I,
    teacher_unet: Any,
    x0_student: Array,
    t: Array,
    noise: Array,
    context: Any,
    uncond: Any,
    guidance_scale: float,
) -> tuple[Array, Array]:
    """`(L_distill, per-sample c(t)·‖x̂θ − x̂ψ‖² (B,))` for teacher timesteps `t` `(B,)` and the
    re-noising noise `noise` (shaped like `x0_student`); the teacher's estimate is not
    differentiated, the student's is."""
    alpha, sigma = common.alpha_sigma(model.schedule, t)
    noisy = diffusion.add_noise(jax.lax.stop_gradient(x0_student), noise, alpha, sigma)
    out = sampling.guided_output(
        model.apply_unet,
        teacher_unet,
        noisy,
        t.astype(jnp.float32),
        context,
        uncond,
        guidance_scale,
    )
    x0_teacher = jax.lax.stop_gradient(common.x0_eps_from_output(model, out, noisy, t)[0])
    per_sample = alpha.reshape(-1) * jnp.mean((x0_student - x0_teacher) ** 2, axis=(1, 2, 3))
    return jnp.mean(per_sample), per_sample


def make(config: ml_collections.ConfigDict) -> Method:
    addc = ADDConfig(**config.add.to_dict())
    model = T2I.from_config(config)
    schedule = model.schedule
    T = schedule.num_train_timesteps
    empty_tokens = model.tokenizer()([""])[0]
    student_ts = jnp.asarray(diffusion.timesteps_for(T, addc.student_steps, "trailing"))
    sampler = sampling.SamplerConfig(**config.sample.to_dict())
    discriminator = common.LatentDiscriminator(
        model, addc.disc_width, addc.disc_t_max, addc.r1_weight, addc.adv_weight
    )

    load_teacher, load_frozen = common.frozen_loaders(config, model)

    def init(rng: Array) -> dict[str, Any]:
        del rng  # the student starts as the teacher
        return {"unet": load_teacher()["unet"]}

    def conditioning(frozen, batch):
        return common.conditioning(model, frozen["teacher"]["text"], batch, empty_tokens)

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        k_lat, k_s, k_eps, k_t, k_renoise, k_adv = jax.random.split(rng, 6)
        context, pooled, uncond = conditioning(frozen, batch)
        teacher_unet = frozen["teacher"]["unet"]
        x0 = model.batch_latents(frozen["vae"], batch, k_lat)
        b = x0.shape[0]
        s = student_ts[jax.random.randint(k_s, (b,), 0, addc.student_steps)]
        alpha, sigma = common.alpha_sigma(schedule, s)
        x_s = diffusion.add_noise(x0, jax.random.normal(k_eps, x0.shape), alpha, sigma)
        x0_student, _ = common.predict_x0(model, model.apply_unet, params["unet"], x_s, s, context)
        t = jax.random.randint(k_t, (b,), 0, T)
        distill, _ = distillation_loss(
            model,
            teacher_unet,
            x0_student,
            t,
            jax.random.normal(k_renoise, x0.shape),
            context,
            uncond,
            addc.guidance_scale,
        )
        return discriminator.add_generator_term(
            addc.distill_weight * distill,
            {"distill": distill},
            disc_params,
            teacher_unet,
            x0_student,
            context,
            pooled,
            k_adv,
        )

    method = common.student_method(
        model,
        sampler,
        discriminator,
        config.data.image_size,
        init=init,
        load_frozen=load_frozen,
        generator_loss=generator_loss,
    )
    return common.maybe_lora(method, config, {"unet": model}, model)
