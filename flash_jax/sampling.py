"""Samplers as pure functions: DDIM (η ≥ 0), DPM-Solver++(2M), Euler; CFG (+ rescale); Noise Correction.

Every sampler is the same `lax.scan` over per-step coefficient arrays precomputed in numpy from the
schedule (`plan`), so one compiled loop serves all three and the step maths is tested in isolation
(`ddim_update`, `dpmpp_2m_update`). Latents are NHWC `(B, H, W, C)`; the model is any
`apply_fn(params, x, t, context) -> output` with `t` float32 `(B,)`, output shaped like `x` and of
the schedule's prediction type (ε, v or x0).

Step rule: step i goes from the model timestep t_i to the next one t_{i+1} (the last step to the
clean signal, ᾱ = 1, or to ᾱ_0 with `final_alpha_one=False` like diffusers' `set_alpha_to_one=False`).
diffusers' DDIM instead steps to `t_i − T//N`, which differs by one timestep for "trailing" and
"linspace" spacings; the step functions take explicit (α, σ) so tests can use either rule.

Noise Correction (Imagine Flash; docs/method.md, "The student's sampler"): on the first step
the DDIM direction term uses the true initial noise x_T instead of the model's ε̂; x̂0 still uses
ε̂. Meant for trailing spacing, whose first step is t = T − 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import diffusion

SamplerName = Literal["ddim", "dpmpp_2m", "euler"]
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to sample. All fields are static (hashable) so the config can key a compiled loop."""

    name: SamplerName = "ddim"  # ddim | dpmpp_2m | euler
    num_steps: int = 25  # network evaluations (×2 with CFG)
    spacing: diffusion.Spacing = "trailing"  # leading | linspace | trailing
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    guidance_scale: float = 1.0  # CFG weight w: u + w·(c − u); 1 disables the unconditional pass
    guidance_rescale: float = 0.0  # φ of Lin et al. (0 disables)
    noise_correction: bool = False  # Imagine Flash: true noise in the first step's direction term
    final_alpha_one: bool = True  # the last step lands on the clean signal (ᾱ = 1)
    steps_offset: int = 0  # added to "leading" timesteps (SD1.x scheduler configs use 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-step coefficients, each float32 `(N,)`: the model timestep, current and next (α, σ), the
    DDIM noise std, and the DPM-Solver++ second-order weight (0 where a step is first order)."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    alpha_next: np.ndarray
    sigma_next: np.ndarray
    eta_std: np.ndarray
    dpm_weight: np.ndarray


def plan(schedule: diffusion.Schedule, config: SamplerConfig) -> Plan:
    """Precomputes the step coefficients of `config` on `schedule` (numpy, outside jit)."""
    T = schedule.num_train_timesteps
    ts = diffusion.timesteps_for(T, config.num_steps, config.spacing, config.steps_offset)
    acp = schedule.alphas_cumprod.astype(np.float64)
    if config.name != "ddim":
        # ᾱ floored at 2^-24 (as diffusers' DPM-Solver/Euler do for zero terminal SNR) so that
        # the log-SNR and the VE noise level stay finite at t = T − 1.
        acp = np.maximum(acp, 2.0**-24)
    final = 1.0 if config.final_alpha_one else acp[0]
    if config.name == "euler":
        # Euler (diffusers EulerDiscreteScheduler): timesteps may be fractional ("linspace"),
        # the VE noise level s = σ/α is interpolated linearly between integer timesteps.
        t_model = _euler_timesteps(T, config)
        s_table = np.sqrt((1 - acp) / acp)
        s = np.interp(t_model, np.arange(T), s_table)
        acp_t = 1.0 / (1.0 + s**2)
        acp_next = np.append(acp_t[1:], final)
    else:
        t_model = ts.astype(np.float64)
        acp_t = acp[ts]
        acp_next = np.append(acp[ts[1:]], final)
    var = (1 - acp_next) / (1 - acp_t) * (1 - acp_t / acp_next)
    eta_std = config.eta * np.sqrt(np.maximum(var, 0.0))
    # DPM-Solver++(2M) midpoint: weight 0.5/r with r = h_prev/h; first order on the first and the
    # last step (diffusers' lower_order_final with final sigma 0).
    with np.errstate(divide="ignore"):  # ᾱ = 0 (DDIM, zero terminal SNR) → λ = −∞, weight 0
        lam = 0.5 * np.log(acp_t) - 0.5 * np.log1p(-acp_t)
    lam_next = np.append(lam[1:], np.inf)
    h = lam_next - lam
    dpm_weight = np.zeros_like(h)
    if len(h) > 2:
        dpm_weight[1:-1] = 0.5 * h[1:-1] / (lam[1:-1] - lam[:-2])
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return Plan(
        t=f32(t_model),
        alpha=f32(np.sqrt(acp_t)),
        sigma=f32(np.sqrt(1 - acp_t)),
        alpha_next=f32(np.sqrt(acp_next)),
        sigma_next=f32(np.sqrt(1 - acp_next)),
        eta_std=f32(eta_std),
        dpm_weight=f32(dpm_weight),
    )


def _euler_timesteps(T: int, config: SamplerConfig) -> np.ndarray:
    n = config.num_steps
    if config.spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if config.spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + config.steps_offset
    return np.arange(T, 0, -T / n).round() - 1.0


def ddim_update(
    x0: jnp.ndarray,
    eps: jnp.ndarray,
    alpha_next,
    sigma_next,
    eta_std=0.0,
    noise: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """x_next = α_next·x̂0 + sqrt(σ_next² − std²)·D + std·z (DDIM; D = ε̂ or, corrected, x_T)."""
    direction = jnp.sqrt(jnp.maximum(sigma_next**2 - eta_std**2, 0.0)) * eps
    out = alpha_next * x0 + direction
    if noise is not None:
        out = out + eta_std * noise
    return out


def dpmpp_2m_update(
    x: jnp.ndarray,
    x0: jnp.ndarray,
    x0_prev: jnp.ndarray,
    alpha,
    sigma,
    alpha_next,
    sigma_next,
    weight,
) -> jnp.ndarray:
    """DPM-Solver++(2M): `(σ_n/σ)·x + α_n·(1 − e^{−h})·(x̂0 + w·(x̂0 − x̂0_prev))`.

    e^{−h} = (α·σ_n)/(σ·α_n) is computed directly, so the final step to σ_n = 0 is exact (→ x̂0).
    """
    exp_neg_h = alpha * sigma_next / (sigma * alpha_next)
    d = x0 + weight * (x0 - x0_prev)
    return (sigma_next / sigma) * x + alpha_next * (1.0 - exp_neg_h) * d


def classifier_free_guidance(
    out_uncond: jnp.ndarray, out_cond: jnp.ndarray, scale: float, rescale: float = 0.0
) -> jnp.ndarray:
    """`u + w·(c − u)`, then optionally rescaled toward the conditional output's per-sample std."""
    guided = out_uncond + scale * (out_cond - out_uncond)
    if rescale > 0.0:
        axes = tuple(range(1, guided.ndim))
        factor = jnp.std(out_cond, axis=axes, keepdims=True) / jnp.std(
            guided, axis=axes, keepdims=True
        )
        guided = rescale * guided * factor + (1.0 - rescale) * guided
    return guided


def guided_output(
    apply_fn: ApplyFn,
    params: Any,
    x: jnp.ndarray,
    t: jnp.ndarray,
    cond: Any,
    uncond: Any,
    scale: float | jnp.ndarray,
    rescale: float = 0.0,
) -> jnp.ndarray:
    """One model evaluation with CFG: a single call on the batch `[uncond; cond]` unless `scale`
    is the number 1.

    `cond` / `uncond` are pytrees of arrays with leading batch dimension B (e.g. text embeddings
    `(B, L, D)`); `t` is `(B,)`; `scale` a number or per-sample `(B,)`.
    """
    if uncond is None or (isinstance(scale, int | float) and scale == 1.0):
        return apply_fn(params, x, t, cond)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    out_u, out_c = jnp.split(out, 2)
    return classifier_free_guidance(out_u, out_c, _per_sample(scale, x), rescale)


def _per_sample(value: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """A step coefficient, scalar or per-sample `(B,)`, shaped to broadcast against `x`."""
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim)) if value.ndim else value


def run_plan(
    apply_fn: ApplyFn,
    params: Any,
    x_T: jnp.ndarray,
    steps: Plan | dict,
    cond: Any,
    uncond: Any,
    config: SamplerConfig,
    prediction_type: diffusion.PredictionType,
    rng: jax.Array | None = None,
    num_active: jnp.ndarray | int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The sampling loop (traceable; call inside jit). Returns `(x_final, x0_last)`.

    `steps` holds the coefficient arrays of `Plan`, each `(N,)` (shared by the batch) or `(N, B)`
    (per sample, e.g. a teacher solve starting from a different timestep for every sample).
    `num_active` (traced int or `(B,)` ints) runs only the first `num_active` steps; later steps
    leave the state untouched. That is the backward-distillation rollout `x_{T→t}` for randomly
    drawn t with a static number of steps. `x0_last` is the last active step's clean estimate.
    """
    coef = jax.tree.map(
        jnp.asarray, dataclasses.asdict(steps) if isinstance(steps, Plan) else steps
    )
    n = coef["t"].shape[0]
    if config.eta > 0 and config.name == "ddim" and rng is None:
        raise ValueError("DDIM with eta > 0 needs an explicit rng key")
    batch = x_T.shape[0]

    def body(carry, inputs):
        x, x0_prev = carry
        i, c = inputs
        t = jnp.broadcast_to(c["t"], (batch,)).astype(jnp.float32)
        out = guided_output(
            apply_fn, params, x, t, cond, uncond, config.guidance_scale, config.guidance_rescale
        )
        c = {k: _per_sample(v, x) for k, v in c.items()}
        a, s, a_next, s_next = c["alpha"], c["sigma"], c["alpha_next"], c["sigma_next"]
        x0, eps = diffusion.predict_x0_eps(out, x, a, s, prediction_type)
        if config.noise_correction:
            eps = jnp.where(i == 0, x_T, eps)
        if config.name == "dpmpp_2m":
            x_new = dpmpp_2m_update(x, x0, x0_prev, a, s, a_next, s_next, c["dpm_weight"])
            if config.noise_correction:
                x_new = jnp.where(i == 0, ddim_update(x0, eps, a_next, s_next), x_new)
        else:
            noise = None
            if config.name == "ddim" and config.eta > 0:
                noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            x_new = ddim_update(x0, eps, a_next, s_next, c["eta_std"], noise)
        if num_active is not None:
            active = _per_sample(i < jnp.asarray(num_active), x)
            x_new = jnp.where(active, x_new, x)
            x0 = jnp.where(active, x0, x0_prev)
        return (x_new.astype(x.dtype), x0.astype(x.dtype)), None

    (x, x0), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), (jnp.arange(n), coef))
    return x, x0


def plan_from_timesteps(schedule: diffusion.Schedule, timesteps: jnp.ndarray) -> dict:
    """Traceable DDIM / DPM-Solver++ coefficients for integer timesteps `(N, ...)` (any trailing
    batch shape, e.g. `(N, B)` per-sample solves), descending; the last step lands on ᾱ = 1."""
    acp_table = jnp.asarray(np.maximum(schedule.alphas_cumprod, 2.0**-24))
    acp = acp_table[timesteps]
    acp_next = jnp.concatenate([acp[1:], jnp.ones_like(acp[:1])])
    lam = 0.5 * jnp.log(acp) - 0.5 * jnp.log1p(-acp)
    h = jnp.concatenate([lam[1:], jnp.full_like(lam[:1], jnp.inf)]) - lam
    h_prev = jnp.concatenate([jnp.full_like(lam[:1], jnp.inf), lam[1:] - lam[:-1]])
    n = timesteps.shape[0]
    second_order = (jnp.arange(n) > 0) & (jnp.arange(n) < n - 1)
    second_order = second_order.reshape((n,) + (1,) * (timesteps.ndim - 1))
    dpm_weight = jnp.where(second_order, 0.5 * h / h_prev, 0.0)
    return {
        "t": timesteps.astype(jnp.float32),
        "alpha": jnp.sqrt(acp),
        "sigma": jnp.sqrt(1.0 - acp),
        "alpha_next": jnp.sqrt(acp_next),
        "sigma_next": jnp.sqrt(1.0 - acp_next),
        "eta_std": jnp.zeros_like(acp),
        "dpm_weight": dpm_weight,
    }


@functools.partial(jax.jit, static_argnames=("apply_fn", "config", "prediction_type"))
def _sample_jit(apply_fn, params, x_T, steps, cond, uncond, rng, *, config, prediction_type):
    return run_plan(apply_fn, params, x_T, steps, cond, uncond, config, prediction_type, rng)[0]


def sample(
    apply_fn: ApplyFn,
    params: Any,
    x_T: jnp.ndarray,
    schedule: diffusion.Schedule,
    config: SamplerConfig,
    *,
    cond: Any = None,
    uncond: Any = None,
    rng: jax.Array | None = None,
) -> jnp.ndarray:
    """Samples from initial noise `x_T` (B, H, W, C) to the final x0 (B, H, W, C); one compiled loop.

    `apply_fn` must be hashable (a module's `apply`, a top-level function); `params` and the
    conditioning are jit arguments, never baked into the program. `uncond` is needed when
    `config.guidance_scale != 1`.
    """
    if config.guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={config.guidance_scale} needs `uncond` conditioning")
    if rng is None:
        rng = jax.random.key(0)
    steps = dataclasses.asdict(plan(schedule, config))
    return _sample_jit(
        apply_fn,
        params,
        x_T,
        steps,
        cond,
        uncond,
        rng,
        config=config,
        prediction_type=schedule.prediction_type,
    )
