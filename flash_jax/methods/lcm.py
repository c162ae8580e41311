"""Latent consistency distillation (LCM, Luo et al. 2023; docs/method.md, "Baselines"): the
1/2/3-step baseline.

One generator step (forward-noised REAL latents, like the paper):

  n ~ U{0..K−1}; t = t_n on the solver grid t_n = (n+1)·k − 1 (skip k, K = T/k steps); t' = t − k
  (clamped at 0); z_t = α_t·x0 + σ_t·ε
  s ~ U[s_min, s_max] (a CFG scale), w = s − 1, embedded into the student's UNet (`timestep_cond`)
  f_θ(z, t, w) = c_skip(t)·z + c_out(t)·x̂0(z, ε̂_θ(z, t, w), t)                consistency function
  ẑ_{t'} = sg(one DDIM step t → t' of the frozen teacher with CFG scale s)       the ODE solver
  L = d(f_θ(z_t, t, w), sg(f_θ⁻(ẑ_{t'}, t', w)))          d: pseudo-Huber `√(Δ² + c²) − c` or L2
  after the optimizer update (`Method.post_update`): θ⁻ ← μ·θ⁻ + (1 − μ)·θ, μ = target_decay

θ⁻ (the target network) lives in the trainable pytree as `params["target"]`, only ever used under
stop-gradient, so its gradient is zero and `post_update` alone sets it (the optimizer keeps Adam
moments for it, which stay zero: a memory cost of 2× the UNet, no effect on the numbers).

Boundary condition (diffusers' `LCMScheduler`): c_skip(t) = σ_d²/((λ·t)² + σ_d²),
c_out(t) = λ·t/√((λ·t)² + σ_d²), σ_d = 0.5, λ = 10 (timestep_scaling): c_skip(0) = 1, c_out(0) = 0.

Multi-step sampling (`generate`): timesteps taken from the solver grid like `LCMScheduler`
(N = 1: 999; 2: 999, 499; 3: 999, 679, 339); each step evaluates f and re-noises it with FRESH noise
to the next timestep; the last step returns f.

config reads: model.*, schedule.*, teacher_workdir, autoencoder_workdir (or model.pretrained) and
`lcm.*` (configs/shapes/lcm.py documents every knob). Batches may carry cached latents and text
embeddings (flash_jax/data/cache.py), read through `T2I.batch_latents` / `common.conditioning`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import diffusion, sampling, t2i
from flash_jax.methods import Method, common
from flash_jax.t2i import T2I

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LCMConfig:
    """`config.lcm` (configs/shapes/lcm.py documents every field)."""

    skip: int = 20
    guidance_scale_min: float = 2.0
    guidance_scale_max: float = 6.0
    guidance_scale: float = 4.0
    w_embedding_dim: int = 64
    target_decay: float = 0.95
    distance: str = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    sample_steps: int = 4

    def __post_init__(self):
        if self.distance not in ("huber", "l2"):
            raise ValueError(f"lcm.distance={self.distance!r} is not 'huber' or 'l2'")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"lcm.target_decay={self.target_decay} must be in [0, 1)")
        if not 1.0 <= self.guidance_scale_min <= self.guidance_scale_max:
            raise ValueError(
                f"lcm.guidance_scale_min={self.guidance_scale_min}, guidance_scale_max="
                f"{self.guidance_scale_max}: need 1 <= min <= max"
            )


def solver_timesteps(num_train_timesteps: int, skip: int) -> np.ndarray:
    """The solver grid `(K,)` int32, ascending: `(n+1)·skip − 1` for n < K = T/skip."""
    if skip < 1 or num_train_timesteps % skip:
        raise ValueError(f"lcm.skip={skip} must divide num_train_timesteps={num_train_timesteps}")
    return (np.arange(1, num_train_timesteps // skip + 1) * skip - 1).astype(np.int32)


def inference_timesteps(num_train_timesteps: int, skip: int, num_steps: int) -> np.ndarray:
    """`num_steps` descending timesteps from the solver grid at evenly spaced indices of the
    reversed grid (diffusers' `LCMScheduler.set_timesteps`)."""
    grid = solver_timesteps(num_train_timesteps, skip)[::-1]
    if not 1 <= num_steps <= len(grid):
        raise ValueError(f"num_steps={num_steps}: LCM samples 1..{len(grid)} steps")
    return grid[np.floor(np.linspace(0, len(grid), num_steps, endpoint=False)).astype(np.int64)]


def boundary_scalings(t: Array, sigma_data: float, timestep_scaling: float) -> tuple[Array, Array]:
    """`(c_skip(t), c_out(t))` float32, shaped like `t`: c_skip(0) = 1, c_out(0) = 0."""
    scaled = jnp.asarray(t, jnp.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out


def consistency_fn(
    model: T2I, lcmc: LCMConfig, unet_params: Any, z: Array, t: Array, cond: dict
) -> Array:
    """f(z, t, w) = c_skip(t)·z + c_out(t)·x̂0 for a guidance-conditioned UNet; `t` int `(B,)`,
    `cond = {"context", "w"}` (`common.guided_apply`)."""
    x0, _ = common.predict_x0(model, common.guided_apply(model), unet_params, z, t, cond)
    c_skip, c_out = boundary_scalings(t, lcmc.sigma_data, lcmc.timestep_scaling)
    return c_skip.reshape(-1, 1, 1, 1) * z + c_out.reshape(-1, 1, 1, 1) * x0


def teacher_solver_step(
    model: T2I,
    teacher_unet: Any,
    z: Array,
    t: Array,
    t_prev: Array,
    context: Any,
    uncond: Any,
    scale: Array,
) -> Array:
    """One deterministic DDIM step t → t_prev `(B,)` of the frozen teacher with per-sample CFG
    scale `scale` `(B,)`: `α_{t'}·x̂0 + σ_{t'}·ε̂` of the guided output (not differentiated)."""
    guided = sampling.guided_output(
        model.apply_unet, teacher_unet, z, t.astype(jnp.float32), context, uncond, scale
    )
    x0, eps = common.x0_eps_from_output(model, guided, z, t)
    alpha_prev, sigma_prev = common.alpha_sigma(model.schedule, t_prev)
    return jax.lax.stop_gradient(sampling.ddim_update(x0, eps, alpha_prev, sigma_prev))


def consistency_apply(model: T2I, lcmc: LCMConfig) -> sampling.ApplyFn:
    """`apply_fn` for the samplers whose clean estimate IS the consistency function: it returns
    the model output (of the schedule's prediction type) that the sampler turns into f(z, t, w)."""

    def apply(unet_params: Any, z: Array, t: Array, cond: dict) -> Array:
        t_int = jnp.round(t).astype(jnp.int32)
        f = consistency_fn(model, lcmc, unet_params, z, t_int, cond)
        alpha, sigma = common.alpha_sigma(model.schedule, t_int)
        return diffusion.model_output_from_x0(f, z, alpha, sigma, model.schedule.prediction_type)

    return apply


def sampler_steps(schedule: diffusion.Schedule, lcmc: LCMConfig, num_steps: int) -> dict:
    """Plan arrays `(N,)` of the multi-step sampler: DDIM coefficients whose noise std is the whole
    σ of the next timestep (the estimate is re-noised with fresh noise, no ε̂ direction)."""
    ts = inference_timesteps(schedule.num_train_timesteps, lcmc.skip, num_steps)
    steps = sampling.plan_from_timesteps(schedule, jnp.asarray(ts))
    return steps | {"eta_std": steps["sigma_next"]}


def make(config: ml_collections.ConfigDict) -> Method:
    lcmc = LCMConfig(**config.lcm.to_dict())
    model = T2I.from_config(config)
    student_model = common.with_guidance_input(model, lcmc.w_embedding_dim)
    schedule = model.schedule
    tokenizer = model.tokenizer()
    empty_tokens = tokenizer([""])[0]
    grid = solver_timesteps(schedule.num_train_timesteps, lcmc.skip)

    load_teacher, load_frozen = common.frozen_loaders(config, model)

    def init(rng: Array) -> dict[str, Any]:
        del rng  # the student starts as the (conditional) teacher
        student = common.student_from_teacher(student_model, load_teacher()["unet"])
        return {"unet": student, "target": jax.tree.map(np.copy, student)}

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        del disc_params
        k_lat, k_n, k_eps, k_w = jax.random.split(rng, 4)
        teacher = frozen["teacher"]
        context, _, uncond = common.conditioning(model, teacher["text"], batch, empty_tokens)
        x0 = model.batch_latents(frozen["vae"], batch, k_lat)
        b = x0.shape[0]
        t = jnp.asarray(grid)[jax.random.randint(k_n, (b,), 0, len(grid))]
        t_prev = jnp.maximum(t - lcmc.skip, 0)
        alpha, sigma = common.alpha_sigma(schedule, t)
        z = diffusion.add_noise(x0, jax.random.normal(k_eps, x0.shape), alpha, sigma)
        scale = jax.random.uniform(
            k_w, (b,), minval=lcmc.guidance_scale_min, maxval=lcmc.guidance_scale_max
        )
        cond = {"context": context, "w": scale - 1.0}
        prediction = consistency_fn(student_model, lcmc, params["unet"], z, t, cond)
        z_prev = teacher_solver_step(model, teacher["unet"], z, t, t_prev, context, uncond, scale)
        target_params = jax.lax.stop_gradient(params["target"])
        target = consistency_fn(student_model, lcmc, target_params, z_prev, t_prev, cond)
        target = jax.lax.stop_gradient(target)
        diff = prediction - target
        if lcmc.distance == "huber":
            loss = jnp.mean(jnp.sqrt(diff**2 + lcmc.huber_c**2) - lcmc.huber_c)
        else:
            loss = jnp.mean(diff**2)
        return loss, {"mse": jnp.mean(diff**2)}

    def post_update(params, new_params):
        mu = lcmc.target_decay
        target = jax.tree.map(
            lambda old, new: mu * old + (1.0 - mu) * new, params["target"], new_params["unet"]
        )
        return {"unet": new_params["unet"], "target": target}

    def generate(params, frozen, tokens, x_T, rng, num_steps: int):
        text = frozen["teacher"]["text"]
        context = model.encode_text(text, tokens)
        w = jnp.full((tokens.shape[0],), lcmc.guidance_scale - 1.0)
        latents, _ = sampling.run_plan(
            consistency_apply(student_model, lcmc),
            params["unet"],
            x_T,
            sampler_steps(schedule, lcmc, num_steps),
            {"context": context, "w": w},
            None,
            sampling.SamplerConfig(num_steps=num_steps, eta=1.0),
            schedule.prediction_type,
            rng,
        )
        return model.to_images(frozen["vae"], latents)

    def logical_axes():
        axes = student_model.logical_axes()
        return axes | {"target": axes["unet"]}  # θ⁻ is sharded like the student

    method = Method(
        init=init,
        load_frozen=load_frozen,
        generator_loss=generator_loss,
        prepare_batch=functools.partial(t2i.prepare_batch, tokenizer=tokenizer, model=model),
        sample=common.grid_sample(model, generate, lcmc.sample_steps),
        generate=generate,
        post_update=post_update,
        logical_axes=logical_axes,
    )
    # LCM-LoRA: θ and θ⁻ are factor trees on the teacher; post_update's EMA acts on the factors.
    return common.maybe_lora(
        method, config, {"unet": student_model, "target": student_model}, model
    )
