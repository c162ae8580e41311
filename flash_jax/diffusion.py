"""Discrete variance-preserving noise schedules and the maths between ε, v and x0.

Notation (docs/method.md): `x_t = α_t·x_0 + σ_t·ε`, `α_t = sqrt(ᾱ_t)`, `σ_t = sqrt(1 − ᾱ_t)`,
integer training timesteps `t = 0 … T−1`. Schedules are numpy tables computed once (float64 maths,
stored as float32 like diffusers' torch schedulers); the conversions below are pure jnp functions
that work on any array shape (broadcast α/σ against `x`, e.g. `(B, 1, 1, 1)` for NHWC latents).

Numerics reference: diffusers `DDIMScheduler` / `DPMSolverMultistepScheduler` (tested for parity).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
import numpy as np

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
Spacing = Literal["leading", "linspace", "trailing"]

# The smallest α used as a divisor when recovering x0 from an ε prediction. With a zero-terminal-SNR
# schedule α_{T-1} is exactly 0 and x0 = (x − σ·ε)/α is undefined; diffusers' DPM-Solver clamps
# ᾱ_{T-1} to 2^-24 for the same reason, i.e. α ≥ 2^-12. ε-prediction models are ill-posed there
# anyway (use v-prediction with zero terminal SNR); the clamp only keeps the maths finite.
ALPHA_MIN = 2.0**-12


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete VP noise schedule.

    Attributes:
      alphas_cumprod: ᾱ_t, float32 `(T,)`.
      prediction_type: what the model trained on this schedule predicts.
      num_train_timesteps: T.
    """

    alphas_cumprod: np.ndarray
    prediction_type: PredictionType = "epsilon"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def alphas(self) -> np.ndarray:
        """α_t = sqrt(ᾱ_t), float32 `(T,)`."""
        return np.sqrt(self.alphas_cumprod)

    @property
    def sigmas(self) -> np.ndarray:
        """σ_t = sqrt(1 − ᾱ_t), float32 `(T,)`."""
        return np.sqrt(1.0 - self.alphas_cumprod)

    def alpha_sigma(self, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """α_t, σ_t gathered at integer timesteps `t` (any shape) as jnp float32 arrays."""
        acp = jnp.asarray(self.alphas_cumprod)[t]
        return jnp.sqrt(acp), jnp.sqrt(1.0 - acp)


def betas_for(
    kind: BetaSchedule,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> np.ndarray:
    """β_t for the named schedule, float32 `(T,)`, as diffusers computes them."""
    T = num_train_timesteps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float32)
    if kind == "scaled_linear":
        return (np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float32) ** 2).astype(
            np.float32
        )
    if kind == "squaredcos_cap_v2":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return np.asarray(betas, dtype=np.float32)
    raise ValueError(
        f"beta_schedule={kind!r} is not one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'"
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales β so that ᾱ_{T−1} = 0 (Lin et al. 2023): shift and scale sqrt(ᾱ), keep sqrt(ᾱ_0)."""
    alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64))
    s = np.sqrt(alphas_cumprod)
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    acp = s**2
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
    return (1.0 - alphas).astype(np.float32)


def make_schedule(
    beta_schedule: BetaSchedule = "scaled_linear",
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_betas_zero_snr: bool = False,
    prediction_type: PredictionType = "epsilon",
) -> Schedule:
    """Builds a schedule; defaults are Stable Diffusion's (scaled_linear 0.00085 → 0.012, T = 1000).

    Argument names follow diffusers' scheduler configs, so `make_schedule(**scheduler_config)` works
    after dropping sampler-only keys (see `schedule_from_diffusers`).
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type={prediction_type!r} is not epsilon/v_prediction/sample")
    betas = betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    # float32 cumprod, exactly like the torch schedulers.
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    return Schedule(alphas_cumprod=alphas_cumprod, prediction_type=prediction_type)


_SCHEDULE_KEYS = (
    "beta_schedule",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "rescale_betas_zero_snr",
    "prediction_type",
)


def schedule_from_diffusers(scheduler_config: dict) -> Schedule:
    """A schedule from a diffusers `scheduler_config.json` dict (sampler-only keys are ignored)."""
    if scheduler_config.get("trained_betas") is not None:
        raise ValueError("scheduler config key 'trained_betas' is not supported")
    return make_schedule(
        **{k: scheduler_config[k] for k in _SCHEDULE_KEYS if k in scheduler_config}
    )


def timesteps_for(
    num_train_timesteps: int, num_steps: int, spacing: Spacing = "trailing", steps_offset: int = 0
) -> np.ndarray:
    """The integer model timesteps of an `num_steps`-step sampler, descending, int32 `(num_steps,)`.

    Same rule as diffusers' DDIMScheduler.set_timesteps: "trailing" starts at T−1 (999, 666, 332
    for 3 steps), "leading" ends at 0 (plus `steps_offset`), "linspace" spans [0, T−1] rounded.
    """
    T, n = num_train_timesteps, num_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_steps={n} must be in [1, {T}]")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"timestep spacing={spacing!r} is not leading/linspace/trailing")
    return ts.astype(np.int32)


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, alpha: jnp.ndarray, sigma: jnp.ndarray):
    """q(x_t | x_0): `α·x0 + σ·ε`; α, σ broadcast against x0."""
    return alpha * x0 + sigma * noise


def x0_from_eps(x: jnp.ndarray, eps: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """x̂0 = (x − σ·ε̂)/α with α clamped to `ALPHA_MIN` (finite at zero terminal SNR)."""
    return (x - sigma * eps) / jnp.maximum(alpha, ALPHA_MIN)


def eps_from_x0(x: jnp.ndarray, x0: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """ε̂ = (x − α·x̂0)/σ; σ is > 0 at every training timestep."""
    return (x - alpha * x0) / sigma


def v_target(x0: jnp.ndarray, eps: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """v = α·ε − σ·x0 (the v-prediction training target)."""
    return alpha * eps - sigma * x0


def min_snr_weight(alpha, sigma, gamma: float, prediction_type: PredictionType) -> jnp.ndarray:
    """Min-SNR-γ loss weight (Hang et al. 2023) for the MSE on a `prediction_type` target.

    Makes the loss equal to min(SNR, γ)·‖x̂0 − x0‖² whatever the parameterisation (SNR = α²/σ²):
    the ε-loss is SNR·‖x̂0 − x0‖² and the v-loss (SNR + 1)·‖x̂0 − x0‖². It caps the weight of the
    nearly clean timesteps, whose fine-detail loss otherwise dominates the gradient.
    """
    snr = (alpha / sigma) ** 2
    capped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return capped / snr
    if prediction_type == "v_prediction":
        return capped / (snr + 1.0)
    if prediction_type == "sample":
        return capped
    raise ValueError(f"prediction_type={prediction_type!r} is not epsilon/v_prediction/sample")


def predict_x0_eps(
    model_output: jnp.ndarray, x: jnp.ndarray, alpha, sigma, prediction_type: PredictionType
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x̂0, ε̂) from a model output of the given prediction type at noise level (α, σ)."""
    if prediction_type == "epsilon":
        return x0_from_eps(x, model_output, alpha, sigma), model_output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * model_output, alpha * model_output + sigma * x
    if prediction_type == "sample":
        return model_output, eps_from_x0(x, model_output, alpha, sigma)
    raise ValueError(f"prediction_type={prediction_type!r} is not epsilon/v_prediction/sample")


def model_output_from_x0(
    x0: jnp.ndarray, x: jnp.ndarray, alpha, sigma, prediction_type: PredictionType
) -> jnp.ndarray:
    """The model output of `prediction_type` whose clean estimate at (x, α, σ) is `x0` (the inverse
    of `predict_x0_eps`'s x̂0): lets a sampler run a model parameterised another way, e.g. a
    consistency function. ε needs σ > 0 (every training timestep)."""
    if prediction_type == "epsilon":
        return eps_from_x0(x, x0, alpha, sigma)
    if prediction_type == "v_prediction":
        return v_target(x0, eps_from_x0(x, x0, alpha, sigma), alpha, sigma)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r} is not epsilon/v_prediction/sample")
