"""Guided step distillation (Meng et al. 2023 + Salimans & Ho 2022; docs/method.md, "Baselines"):
the 4-step baseline. One method, two stages, each stage a run of its own (configs/shapes/step_distill.py):

stage "guidance" (Meng stage 1): a student that reads the guidance weight w (an embedding added to
its timestep embedding, `common.with_guidance_input`) learns the CFG teacher's guided estimate in
ONE network call, at every timestep:
  t ~ U{0..T−1}; z_t = α_t·x0 + σ_t·ε (real latents); s ~ U[s_min, s_max], w = s − 1
  x̃ = sg(x̂0 of the teacher's guided output u + s·(c − u) at z_t)
  L = ω_t·‖x̂0_θ(z_t, t, w) − x̃‖²

stage "progressive" (Meng stage 2, progressive distillation): the student learns in one DDIM step
what the previous stage's student (the frozen teacher here, same w) does in two, N = student_steps
from 2N. Timesteps are the trailing grids, so the student's grid s_0 > … > s_{N−1} is every other
point of the teacher's 2N grid:
  i ~ U{0..N−1}; t = s_i, t' = the teacher's midpoint, t'' = s_{i+1} (the clean level after s_{N−1})
  z_{t''} = sg(teacher DDIM t → t' → t''); x̃ = (z_{t''} − (σ''/σ_t)·z_t)/(α'' − (σ''/σ_t)·α_t)
  L = ω_t·‖x̂0_θ(z_t, t, w) − x̃‖²
x̃ is the clean estimate with which ONE DDIM step t → t'' lands exactly on z_{t''}. The chain
guidance → 2N → … → 4 is a sequence of runs, each starting from the previous one's EMA student
(`step_distill.previous_workdir`). With one teacher step, x̃ reduces to the teacher's own estimate:
stage 1 is the same target with ratio 1.

ω_t: "truncated_snr" max(α²/σ², 1) (Salimans & Ho) or "uniform". Sampling: deterministic DDIM,
trailing spacing, w = `guidance_scale` − 1.

config reads: model.*, schedule.*, teacher_workdir, autoencoder_workdir (or model.pretrained) and
`step_distill.*`. Batches may carry cached latents and text embeddings (flash_jax/data/cache.py).
The frozen tree is `{"teacher": {"unet", "text"}, "vae"}` like the other distillations; in a
progressive stage its `unet` is the previous stage's (guidance-conditioned) student.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import diffusion, frozen, lora, sampling, t2i
from flash_jax.config import read_json
from flash_jax.methods import Method, common
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepDistillConfig:
    """`config.step_distill` (configs/shapes/step_distill.py documents every field)."""

    stage: str = "guidance"
    student_steps: int = 4
    previous_workdir: str = ""
    guidance_scale_min: float = 2.0
    guidance_scale_max: float = 6.0
    guidance_scale: float = 4.0
    w_embedding_dim: int = 64
    loss_weighting: str = "truncated_snr"

    def __post_init__(self):
        if self.stage not in ("guidance", "progressive"):
            raise ValueError(f"step_distill.stage={self.stage!r} is not 'guidance'/'progressive'")
        if self.stage == "progressive" and not self.previous_workdir:
            raise ValueError(
                "step_distill.previous_workdir is empty: a progressive stage distils the student "
                "of the previous stage's run (the guidance stage or a 2N-step stage)"
            )
        if self.student_steps < 1:
            raise ValueError(f"step_distill.student_steps={self.student_steps} must be >= 1")
        if self.loss_weighting not in ("truncated_snr", "uniform"):
            raise ValueError(f"step_distill.loss_weighting={self.loss_weighting!r}")
        if not 1.0 <= self.guidance_scale_min <= self.guidance_scale_max:
            raise ValueError(
                f"step_distill.guidance_scale_min={self.guidance_scale_min}, guidance_scale_max="
                f"{self.guidance_scale_max}: need 1 <= min <= max"
            )


def progressive_timesteps(
    num_train_timesteps: int, student_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(t, t_mid, t_next)`, each int32 `(N,)`: the student's trailing grid, the teacher's points
    between, and the student's next timestep (−1 = the clean signal after the last step)."""
    n = student_steps
    student = diffusion.timesteps_for(num_train_timesteps, n, "trailing")
    teacher = diffusion.timesteps_for(num_train_timesteps, 2 * n, "trailing")
    if not np.array_equal(teacher[::2], student):
        raise ValueError(f"the {n}-step grid is not every other point of the {2 * n}-step grid")
    return student, teacher[1::2], np.append(student[1:], -1).astype(np.int32)


def alpha_sigma_or_clean(schedule: diffusion.Schedule, t: Array) -> tuple[Array, Array]:
    """α_t, σ_t `(B, 1, 1, 1)` at integer timesteps `t` `(B,)`, with t = −1 the clean level (1, 0)."""
    alpha, sigma = common.alpha_sigma(schedule, jnp.maximum(t, 0))
    clean = (t < 0).reshape(-1, 1, 1, 1)
    return jnp.where(clean, 1.0, alpha), jnp.where(clean, 0.0, sigma)


def two_step_target(z_t: Array, z_next: Array, alpha, sigma, alpha_next, sigma_next) -> Array:
    """x̃ with which one DDIM step from (z_t, α, σ) to (α'', σ'') lands on `z_next`."""
    ratio = sigma_next / sigma
    return (z_next - ratio * z_t) / (alpha_next - ratio * alpha)


def teacher_two_steps(
    model: T2I,
    apply_fn: sampling.ApplyFn,
    teacher_unet: Any,
    z_t: Array,
    t: Array,
    t_mid: Array,
    t_next: Array,
    cond: Any,
) -> Array:
    """z_{t''}: two deterministic DDIM steps t → t_mid → t_next (−1: clean) of `apply_fn`."""
    z = z_t
    for now, nxt in ((t, t_mid), (t_mid, t_next)):
        x0, eps = common.predict_x0(model, apply_fn, teacher_unet, z, now, cond)
        z = sampling.ddim_update(x0, eps, *alpha_sigma_or_clean(model.schedule, nxt))
    return jax.lax.stop_gradient(z)


def snr_weight(alpha: Array, sigma: Array, kind: str) -> Array:
    """ω_t `(B,)` from α, σ `(B, 1, 1, 1)`: max(α²/σ², 1) ("truncated_snr") or 1 ("uniform")."""
    if kind == "uniform":
        return jnp.ones(alpha.shape[:1])
    return jnp.maximum((alpha / sigma) ** 2, 1.0).reshape(-1)


def stage_student(workdir: str | Path, config: ml_collections.ConfigDict) -> Any:
    """The full UNet params of a stage's EMA student in `workdir`: a LoRA stage's factors merged
    onto its own frozen teacher (the teacher of `config`, or its previous stage's student)."""
    import ml_collections

    unet = checkpoint.load_params(workdir)["unet"]
    path = Path(workdir) / "config.json"
    if "lora" not in unet or not path.is_file():
        return unet
    run = ml_collections.ConfigDict(read_json(path))
    stage = run.step_distill

    def load_base() -> Any:
        if stage.get("stage") == "progressive":
            return stage_student(stage.previous_workdir, config)
        return frozen.load_teacher(config, T2I.from_config(config), parts=("unet",))["unet"]

    return lora.full_unet(unet, run, load_base)


def make(config: ml_collections.ConfigDict) -> Method:
    sdc = StepDistillConfig(**config.step_distill.to_dict())
    model = T2I.from_config(config)
    student_model = common.with_guidance_input(model, sdc.w_embedding_dim)
    student_apply = common.guided_apply(student_model)
    schedule = model.schedule
    T = schedule.num_train_timesteps
    tokenizer = model.tokenizer()
    empty_tokens = tokenizer([""])[0]
    progressive = sdc.stage == "progressive"
    if progressive:
        grid = tuple(jnp.asarray(a) for a in progressive_timesteps(T, sdc.student_steps))

    load_teacher, load_teacher_and_vae = common.frozen_loaders(config, model)

    def load_previous_student() -> Any:
        previous = Path(sdc.previous_workdir)
        run_config = previous / "config.json"
        if run_config.is_file():
            prev = read_json(run_config).get("step_distill", {})
            if prev.get("student_steps") != 2 * sdc.student_steps:
                raise ValueError(
                    f"step_distill.previous_workdir={str(previous)!r} trained a "
                    f"{prev.get('student_steps')}-step student; a {sdc.student_steps}-step stage "
                    f"needs the {2 * sdc.student_steps}-step one"
                )
        unet = stage_student(previous, config)
        return student_model.check({"unet": unet}, f"previous stage {previous}")["unet"]

    def load_frozen() -> dict[str, Any]:
        if not progressive:
            return load_teacher_and_vae()
        text = frozen.load_teacher(config, model, parts=("text",))["text"]
        teacher = {"unet": load_previous_student(), "text": text}
        return {"teacher": teacher, "vae": frozen.load_autoencoder(config, model)}

    def init(rng: Array) -> dict[str, Any]:
        del rng  # the guidance stage starts from the teacher, a halving from the previous stage
        if progressive:
            return {"unet": load_previous_student()}
        return {"unet": common.student_from_teacher(student_model, load_teacher()["unet"])}

    def student_input(frozen, batch, rng):
        """(z_t, t, t_mid, t_next): forward-noised real latents at the stage's timesteps."""
        k_lat, k_t, k_eps = jax.random.split(rng, 3)
        x0 = model.batch_latents(frozen["vae"], batch, k_lat)
        b = x0.shape[0]
        if progressive:
            i = jax.random.randint(k_t, (b,), 0, sdc.student_steps)
            t, t_mid, t_next = (g[i] for g in grid)
        else:
            t = jax.random.randint(k_t, (b,), 0, T)
            t_mid = t_next = t
        alpha, sigma = common.alpha_sigma(schedule, t)
        z_t = diffusion.add_noise(x0, jax.random.normal(k_eps, x0.shape), alpha, sigma)
        return z_t, t, t_mid, t_next

    def distillation_target(frozen, z_t, t, t_mid, t_next, context, uncond, scale):
        """x̃ of the stage: the guided teacher's estimate, or the two-step target."""
        teacher_unet = frozen["teacher"]["unet"]
        if not progressive:
            guided = sampling.guided_output(
                model.apply_unet, teacher_unet, z_t, t.astype(jnp.float32), context, uncond, scale
            )
            return jax.lax.stop_gradient(common.x0_eps_from_output(model, guided, z_t, t)[0])
        cond = {"context": context, "w": scale - 1.0}
        z_next = teacher_two_steps(
            student_model, student_apply, teacher_unet, z_t, t, t_mid, t_next, cond
        )
        alpha, sigma = common.alpha_sigma(schedule, t)
        target = two_step_target(z_t, z_next, alpha, sigma, *alpha_sigma_or_clean(schedule, t_next))
        return jax.lax.stop_gradient(target)

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        del disc_params
        k_input, k_w = jax.random.split(rng)
        context, _, uncond = common.conditioning(
            model, frozen["teacher"]["text"], batch, empty_tokens
        )
        z_t, t, t_mid, t_next = student_input(frozen, batch, k_input)
        scale = jax.random.uniform(
            k_w, t.shape, minval=sdc.guidance_scale_min, maxval=sdc.guidance_scale_max
        )
        cond = {"context": context, "w": scale - 1.0}
        x0_student, _ = common.predict_x0(
            student_model, student_apply, params["unet"], z_t, t, cond
        )
        target = distillation_target(frozen, z_t, t, t_mid, t_next, context, uncond, scale)
        per_sample = jnp.mean((x0_student - target) ** 2, axis=(1, 2, 3))
        weight = snr_weight(*common.alpha_sigma(schedule, t), sdc.loss_weighting)
        return jnp.mean(weight * per_sample), {"mse": jnp.mean(per_sample)}

    def generate(params, frozen, tokens, x_T, rng, num_steps: int):
        del rng  # deterministic DDIM
        context = model.encode_text(frozen["teacher"]["text"], tokens)
        w = jnp.full((tokens.shape[0],), sdc.guidance_scale - 1.0)
        sampler = sampling.SamplerConfig(num_steps=num_steps)
        latents, _ = sampling.run_plan(
            student_apply,
            params["unet"],
            x_T,
            dataclasses.asdict(sampling.plan(schedule, sampler)),
            {"context": context, "w": w},
            None,
            sampler,
            schedule.prediction_type,
        )
        return model.to_images(frozen["vae"], latents)

    method = Method(
        init=init,
        load_frozen=load_frozen,
        generator_loss=generator_loss,
        prepare_batch=functools.partial(t2i.prepare_batch, tokenizer=tokenizer, model=model),
        sample=common.grid_sample(model, generate, sdc.student_steps),
        generate=generate,
        logical_axes=student_model.logical_axes,  # also covers the plain teacher's tensors
    )
    # A progressive stage's LoRA factors go on its frozen teacher: the previous stage's student.
    base = student_model if progressive else model
    return common.maybe_lora(method, config, {"unet": student_model}, base)
