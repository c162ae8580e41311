"""Imagine Flash (docs/method.md): backward distillation + shifted reconstruction loss + GAN term.

One generator step, all inside the trainer's single compiled program:

  x_T ~ N(0, I); per sample draw N (from `student_steps`) and i ∈ {0..N−1}; t = s_i
  x_t   = stopgrad(student's own N-step sampler run for i steps from x_T)    backward distillation
          (ablation `backward=False`: x_t = α_t·x0_real + σ_t·x_T, forward/leaky)
  x̂0^Θ = x̂0(x_t, ε̂_Θ(x_t, t, c), t)                                       the only gradient path
  t_Φ   = γ(t) (± jitter);  χ = α_{t_Φ}·stopgrad(x̂0^Θ) + σ_{t_Φ}·ε'          SRL re-noising
          (ε' fresh noise; `srl_noise="student"`: ε' = stopgrad(ε̂^Θ), so χ is the student's
          own DDIM step from t to t_Φ and the target a deterministic function of x_T;
          ablation `srl=False`: χ = x_t, t_Φ = t — plain backward distillation)
  x̂0^Φ = stopgrad(teacher k-step CFG solve from χ at t_Φ down to 0)
  L     = w(t)·‖x̂0^Φ − x̂0^Θ‖² + λ_adv·L_adv^G(D(teacher features of re-noised x̂0^Θ))

The discriminator (`common.LatentDiscriminator`, shared with ADD) sees real latents and the
student's x̂0^Θ re-noised to a random level, through the FROZEN teacher UNet's down/mid features,
with trainable heads. Samples (grids, evaluation) use `config.sample` at the requested step count.

config reads: model.*, schedule.*, teacher_workdir, autoencoder_workdir (unused when
model.pretrained names a diffusers folder), and `imagine_flash.*` (`ImagineFlashConfig` documents
every knob and its default). Batches may carry cached latents
and text embeddings (flash_jax/data/cache.py); then neither the VAE encoder nor the text encoder
runs in the step, except on the empty prompt.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import diffusion, sampling
from flash_jax.methods import Method, common
from flash_jax.t2i import T2I

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections

Array = jax.Array


# --------------------------------------------------------------------------------------- γ(t)


def gamma(t: Array, kind: str, num_train_timesteps: int, a: float, b: float, shift: float) -> Array:
    """The shifted teacher timestep t_Φ = γ(t) (float, before jitter/rounding).

    kind "affine": `a·t + b` (a < 1 keeps γ(T−1) < T−1 for b small);
    kind "sd3": `a·T·sτ/(1 + (s−1)τ) + b` on τ = t/T, s = `shift` (SD3-style time shift; s < 1
    shifts toward low noise). The shift alone maps T to T, so `a < 1` is what keeps γ(T) < T.
    Both increase with t for a > 0; callers clip to [1, T−1].
    """
    T = num_train_timesteps
    t = t.astype(jnp.float32)
    if kind == "affine":
        return a * t + b
    if kind == "sd3":
        tau = t / T
        return a * T * shift * tau / (1.0 + (shift - 1.0) * tau) + b
    raise ValueError(f"imagine_flash.gamma={kind!r} is not 'affine' or 'sd3'")


def student_plans(schedule: diffusion.Schedule, steps: tuple[int, ...], noise_correction: bool):
    """Per-N student DDIM coefficients padded to max(steps): dict of `(len(steps), N_max)` arrays,
    plus the student timesteps table `(len(steps), N_max)` (padding repeats the last step)."""
    n_max = max(steps)
    plans, tables = [], []
    for n in steps:
        cfg = sampling.SamplerConfig(
            num_steps=n, spacing="trailing", noise_correction=noise_correction
        )
        p = dataclasses.asdict(sampling.plan(schedule, cfg))
        plans.append({k: np.pad(v, (0, n_max - n), mode="edge") for k, v in p.items()})
        ts = diffusion.timesteps_for(schedule.num_train_timesteps, n, "trailing")
        tables.append(np.pad(ts, (0, n_max - n), mode="edge"))
    stacked = {k: np.stack([p[k] for p in plans]) for k in plans[0]}
    return stacked, np.stack(tables)


def teacher_timesteps(t_phi: Array, k: int) -> Array:
    """k descending integer timesteps `(k, B)` from t_Φ `(B,)` toward 0: round(t_Φ·(k−j)/k)."""
    fractions = (k - jnp.arange(k, dtype=jnp.float32)) / k
    return jnp.round(t_phi[None, :] * fractions[:, None]).astype(jnp.int32)


LOSS_WEIGHTINGS = ("uniform", "alpha", "normalized")
SRL_NOISES = ("fresh", "student", "x_T")


def step_means(values: Array, step: Array, num_steps: int) -> Array:
    """`(num_steps,)`: the mean of `values` `(B,)` over the samples whose student step index
    `step` `(B,)` is 0, 1, …; 0 for an index no sample drew."""
    onehot = jax.nn.one_hot(step, num_steps, dtype=values.dtype)  # (B, num_steps)
    counts = onehot.sum(0)
    return (values @ onehot) / jnp.maximum(counts, 1.0)


def loss_weights(per_sample: Array, t: Array, step: Array, num_steps: int, kind: str, schedule):
    """Per-sample weights `(B,)` of the x̂0 loss (under stop-gradient): "uniform" 1; "alpha"
    α_t (ADD's c(t)); "normalized" 1 / (the batch's mean loss at the sample's student step), so
    every step's term has mean 1 and the t = T step (whose x̂0 error is ε's error times σ/α)
    does not take the whole gradient."""
    if kind == "uniform":
        return jnp.ones_like(per_sample)
    if kind == "alpha":
        return schedule.alpha_sigma(t)[0]
    means = step_means(jax.lax.stop_gradient(per_sample), step, num_steps)
    return 1.0 / jnp.maximum(means[step], 1e-12)


@dataclasses.dataclass(frozen=True)
class ImagineFlashConfig:
    """`config.imagine_flash`: the method's knobs and their defaults, the one place they are set
    (the configs change only what differs for their model; docs/method.md gives the measurement
    behind each choice)."""

    student_steps: tuple[int, ...] = (3,)  # N; several values = one student serving all of them
    backward: bool = True  # backward distillation (False: forward-noised real latents)
    rollout_noise_correction: bool = True  # noise correction in the student's rollout
    srl: bool = True  # shifted reconstruction loss (False: plain backward distillation)
    gamma: str = "affine"  # γ(t): "affine" a·t + b | "sd3" a·T·shift(t/T) + b
    gamma_a: float = 0.75  # γ slope (< 1 keeps γ(T) < T)
    gamma_b: float = 0.0  # γ offset
    gamma_shift: float = 0.5  # s of the "sd3" shift
    gamma_jitter: float = 0.0  # uniform ± jitter of t_Φ in timesteps
    # SRL re-noising ε': "student" (its own ε̂: χ is deterministic) | "x_T" (the sample's initial
    # noise, the paper's equation) | "fresh" (the paper's diagram; with it the target is mostly ε'
    # at large t and the student regresses to the mean: docs/method.md, "Open points")
    srl_noise: str = "student"
    teacher_steps: int = 2  # k: teacher solve steps from t_Φ to 0
    teacher_sampler: str = "ddim"  # "ddim" | "dpmpp_2m"
    guidance_scale: float = 4.0  # teacher CFG inside the solve
    guidance_rescale: float = 0.0  # teacher CFG rescale φ
    # x̂0 loss weight per sample: "normalized" (1 / the batch's mean loss at the sample's student
    # step: every step's term has mean 1; better alignment and closer to the teacher than "uniform"
    # on the testbed, docs/results.md) | "uniform" | "alpha" (c(t) = α_t)
    loss_weighting: str = "normalized"
    adv_weight: float = 0.1  # λ_adv; 0 removes the discriminator
    disc_width: int = 64  # channels of each discriminator head
    disc_t_max: int = 750  # discriminator re-noising levels t_d ~ U[0, disc_t_max)

    def __post_init__(self):
        object.__setattr__(self, "student_steps", tuple(int(n) for n in self.student_steps))
        if not self.student_steps or any(not 1 <= n <= 8 for n in self.student_steps):
            raise ValueError(f"imagine_flash.student_steps={self.student_steps}: need 1..8 steps")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"imagine_flash.loss_weighting={self.loss_weighting!r}: one of {LOSS_WEIGHTINGS}"
            )
        if self.srl_noise not in SRL_NOISES:
            raise ValueError(f"imagine_flash.srl_noise={self.srl_noise!r}: one of {SRL_NOISES}")
        if self.teacher_sampler not in ("ddim", "dpmpp_2m"):
            raise ValueError(f"imagine_flash.teacher_sampler={self.teacher_sampler!r}")
        if self.teacher_steps < 1:
            raise ValueError(f"imagine_flash.teacher_steps={self.teacher_steps} must be >= 1")


def rollout(
    model: T2I,
    unet_params: Any,
    x_T: Array,
    plans: dict,
    which: Array,
    i: Array,
    context: Array,
    noise_correction: bool,
) -> Array:
    """x^Θ_{T→t}: the student's own sampler (plan `which[b]` of `plans`) run `i[b]` steps from x_T,
    under stop-gradient. `plans` are `student_plans` arrays; `which`, `i`: int `(B,)`."""
    # i < N: the last step of a plan is never part of a rollout, so it is not computed at all.
    per_sample = {k: jnp.asarray(v)[which].T[:-1] for k, v in plans.items()}  # (N_max − 1, B)
    n_steps = per_sample["t"].shape[0]
    config = sampling.SamplerConfig(num_steps=max(n_steps, 1), noise_correction=noise_correction)
    x_t, _ = sampling.run_plan(
        model.apply_unet,
        unet_params,
        x_T,
        per_sample,
        context,
        None,
        config,
        model.schedule.prediction_type,
        num_active=i,
    )
    return jax.lax.stop_gradient(x_t)


def srl_target(
    model: T2I,
    ifc: ImagineFlashConfig,
    teacher_unet: Any,
    x0_student: Array,
    x_t: Array,
    t: Array,
    context: Array,
    uncond: Array,
    rng: Array,
    t_phi: Array | None = None,
    x_T: Array | None = None,
) -> tuple[Array, Array]:
    """(x̂0^Φ, t_Φ): the teacher's k-step CFG solve from χ = α_{t_Φ}·sg(x̂0^Θ) + σ_{t_Φ}·ε' at t_Φ
    (γ(t) unless given), under stop-gradient; ε' is fresh noise, with `srl_noise="student"` the
    student's own ε̂ = (x_t − α_t·x̂0^Θ)/σ_t, with "x_T" the initial noise `x_T` of the sample
    (the paper's x_t = α_t·x0 + σ_t·x_T). Without SRL: from the student's state x_t at t."""
    schedule = model.schedule
    T = schedule.num_train_timesteps
    k_eps, k_jit = jax.random.split(rng)
    b = t.shape[0]
    if ifc.srl:
        if t_phi is None:
            t_phi = gamma(t, ifc.gamma, T, ifc.gamma_a, ifc.gamma_b, ifc.gamma_shift)
            if ifc.gamma_jitter > 0:
                t_phi += ifc.gamma_jitter * jax.random.uniform(k_jit, (b,), minval=-1, maxval=1)
            t_phi = jnp.clip(jnp.round(t_phi), 1, T - 1).astype(jnp.int32)
        a_phi, s_phi = common.alpha_sigma(schedule, t_phi)
        if ifc.srl_noise == "student":
            a_t, s_t = common.alpha_sigma(schedule, t)
            noise = (x_t - a_t * x0_student) / s_t
        elif ifc.srl_noise == "x_T":
            if x_T is None:
                raise ValueError("imagine_flash.srl_noise='x_T' needs the initial noise x_T")
            noise = x_T
        else:
            noise = jax.random.normal(k_eps, x0_student.shape)
        chi = jax.lax.stop_gradient(diffusion.add_noise(x0_student, noise, a_phi, s_phi))
    else:
        t_phi, chi = t, x_t
    solve = sampling.plan_from_timesteps(schedule, teacher_timesteps(t_phi, ifc.teacher_steps))
    config = sampling.SamplerConfig(
        name=ifc.teacher_sampler,
        num_steps=ifc.teacher_steps,
        guidance_scale=ifc.guidance_scale,
        guidance_rescale=ifc.guidance_rescale,
    )
    x0_teacher, _ = sampling.run_plan(
        model.apply_unet,
        teacher_unet,
        chi,
        solve,
        context,
        uncond,
        config,
        schedule.prediction_type,
    )
    return jax.lax.stop_gradient(x0_teacher), t_phi


def make(config: ml_collections.ConfigDict) -> Method:
    ifc = ImagineFlashConfig(**config.imagine_flash.to_dict())
    model = T2I.from_config(config)
    schedule = model.schedule
    empty_tokens = model.tokenizer()([""])[0]
    steps = ifc.student_steps
    n_max = max(steps)
    plans, ts_table = student_plans(schedule, steps, ifc.rollout_noise_correction)
    sampler = sampling.SamplerConfig(**config.sample.to_dict())
    discriminator = common.LatentDiscriminator(
        model, ifc.disc_width, ifc.disc_t_max, weight=ifc.adv_weight
    )
    load_teacher, load_frozen = common.frozen_loaders(config, model)

    def init(rng: Array) -> dict[str, Any]:
        del rng  # the student starts as the teacher
        return {"unet": load_teacher()["unet"]}

    def conditioning(frozen, batch):
        return common.conditioning(model, frozen["teacher"]["text"], batch, empty_tokens)

    def student_input(params, frozen, batch, rng, context):
        """(x_t, t, i, x_T): per sample a student step count N and a rollout depth i < N,
        t = s_i, from the initial noise x_T."""
        k_T, k_n, k_i, k_lat = jax.random.split(rng, 4)
        b = batch["tokens"].shape[0]
        x_T = jax.random.normal(k_T, model.batch_latent_shape(batch))
        which = jax.random.randint(k_n, (b,), 0, len(steps))
        i = jnp.floor(jax.random.uniform(k_i, (b,)) * jnp.asarray(steps)[which]).astype(jnp.int32)
        t = jnp.asarray(ts_table)[which, i]
        if ifc.backward:
            x_t = rollout(
                model, params["unet"], x_T, plans, which, i, context, ifc.rollout_noise_correction
            )
        else:
            x0_real = model.batch_latents(frozen["vae"], batch, k_lat)
            alpha, sigma = common.alpha_sigma(schedule, t)
            x_t = diffusion.add_noise(x0_real, x_T, alpha, sigma)
        return x_t, t, i, x_T

    def srl_loss(out, x_t, t, i, x0_teacher):
        """(weighted loss, per-sample unweighted loss `(B,)`) of the UNet output `out`."""
        x0_student = common.x0_eps_from_output(model, out, x_t, t)[0]
        per_sample = jnp.mean((x0_teacher - x0_student) ** 2, axis=(1, 2, 3))
        weights = loss_weights(per_sample, t, i, n_max, ifc.loss_weighting, schedule)
        return jnp.mean(per_sample * jax.lax.stop_gradient(weights)), per_sample

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        k_student, k_srl, k_adv = jax.random.split(rng, 3)
        context, pooled, uncond = conditioning(frozen, batch)
        x_t, t, i, x_T = student_input(params, frozen, batch, k_student, context)
        out = model.apply_unet(params["unet"], x_t, t.astype(jnp.float32), context)
        x0_student = common.x0_eps_from_output(model, out, x_t, t)[0]
        x0_teacher, t_phi = srl_target(
            model,
            ifc,
            frozen["teacher"]["unet"],
            x0_student,
            x_t,
            t,
            context,
            uncond,
            k_srl,
            x_T=x_T,
        )
        srl, per_sample = srl_loss(out, x_t, t, i, x0_teacher)
        # Diagnostics per student step: the unweighted loss, and the norm of the gradient the
        # loss sends into the UNet's output (where each step's share of the update starts).
        grad_out = jax.grad(lambda o: srl_loss(o, x_t, t, i, x0_teacher)[0])(
            jax.lax.stop_gradient(out)
        )
        grad_sq = jnp.sum(grad_out.reshape(grad_out.shape[0], -1) ** 2, axis=1)
        step_loss = step_means(jax.lax.stop_gradient(per_sample), i, n_max)
        step_grad = jnp.sqrt(jax.nn.one_hot(i, n_max, dtype=grad_sq.dtype).T @ grad_sq)
        aux = {"srl": srl, "srl_unweighted": jnp.mean(per_sample)}
        aux["t_phi"] = jnp.mean(t_phi.astype(jnp.float32))
        for j in range(n_max):
            aux[f"srl_step{j}"], aux[f"grad_out_step{j}"] = step_loss[j], step_grad[j]
        teacher_unet = frozen["teacher"]["unet"]
        return discriminator.add_generator_term(
            srl, aux, disc_params, teacher_unet, x0_student, context, pooled, k_adv
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
