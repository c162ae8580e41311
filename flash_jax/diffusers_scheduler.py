"""A diffusers scheduler that samples exactly like a flash-jax student (PyTorch; no flash-jax needed).

flash-jax samples an Imagine Flash student with deterministic DDIM on "trailing" timesteps
(`flash_jax.sampling`; 999, 666, 332 for 3 steps of T = 1000): each step goes from its timestep to
the next one of the same sampler, the last one to the clean signal (ᾱ = 1), and with noise
correction (docs/method.md) the first step's direction term uses the initial noise x_T instead of
the model's ε̂ (x̂0 still uses ε̂). diffusers' own schedulers differ: `DDIMScheduler` steps from t
to t − T//N (333, not 332), `EulerDiscreteScheduler` with trailing spacing scales the initial
noise by σ_max instead of sqrt(σ_max² + 1), and neither has noise correction.

This file imports only numpy, torch and diffusers. `python -m flash_jax.main --mode export` copies
it into the exported folder (`scheduler/flash_jax_scheduler.py`), so one line loads the student:

    pipe = StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(prompt, num_inference_steps=3, guidance_scale=1.0).images

(`StableDiffusionXLPipeline` likewise; docs/stable_diffusion.md). Without remote code, load the
teacher folder with `unet=` the student's and `scheduler=ImagineFlashScheduler.from_pretrained(
folder, subfolder="scheduler")`. Any SD scheduler config converts with
`ImagineFlashScheduler.from_config(pipe.scheduler.config)` (the schedule keys are diffusers').

Noise correction assumes sampling starts from pure noise (text-to-image): it is applied on the
step at the first timestep of `set_timesteps`, where the sample is x_T. ᾱ is computed by
diffusers' float32 rule (`DDIMScheduler`), equal to flash-jax's to ~3e-7.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# flash_jax.diffusion.ALPHA_MIN: x̂0 = (x − σ·ε̂)/max(α, 2^-12) stays finite at zero terminal SNR.
ALPHA_MIN = 2.0**-12


class ImagineFlashScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic DDIM on trailing timesteps with optional Imagine Flash noise correction.

    Config: the training schedule as in diffusers' `DDIMScheduler` (`num_train_timesteps`,
    `beta_start`, `beta_end`, `beta_schedule`, `rescale_betas_zero_snr`, `prediction_type`),
    `set_alpha_to_one` (the last step lands on ᾱ = 1, else on ᾱ_0) and `noise_correction`.
    Latents are NCHW; `init_noise_sigma` is 1 (the pipeline's initial latents are x_T itself) and
    `scale_model_input` is the identity.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        rescale_betas_zero_snr: bool = False,
        prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
        set_alpha_to_one: bool = True,
        noise_correction: bool = True,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type={prediction_type!r}: epsilon, v_prediction, sample")
        self.alphas_cumprod = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        ).alphas_cumprod
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """Trailing timesteps, descending: `round(arange(T, 0, −T/N)) − 1` (999, 666, 332)."""
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {T}]")
        ts = np.round(np.arange(T, 0, -T / num_inference_steps)) - 1
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts.astype(np.int64)).to(device)

    def _alpha_sigma(self, acp: torch.Tensor) -> tuple[float, float]:
        # float64 square roots rounded to float32, as flash_jax.sampling.plan computes them.
        acp = acp.double()
        return float(acp.sqrt().float()), float((1.0 - acp).sqrt().float())

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor]:
        """One step from `timestep` to the next timestep of `set_timesteps` (after the last: to
        ᾱ = 1, or ᾱ_0 without `set_alpha_to_one`): `x = α_next·x̂0 + σ_next·D`, D = ε̂, or on the
        first step with `noise_correction` the initial noise, i.e. `sample` itself."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        where = (self.timesteps.cpu() == int(timestep)).nonzero()
        if len(where) != 1:
            raise ValueError(f"timestep {int(timestep)} is not one of {self.timesteps.tolist()}")
        i = int(where[0, 0])
        alpha, sigma = self._alpha_sigma(self.alphas_cumprod[int(timestep)])
        if i + 1 < len(self.timesteps):
            next_acp = self.alphas_cumprod[int(self.timesteps[i + 1])]
        elif self.config.set_alpha_to_one:
            next_acp = torch.ones(())
        else:
            next_acp = self.alphas_cumprod[0]
        alpha_next, sigma_next = self._alpha_sigma(next_acp)

        out, x = model_output.float(), sample.float()
        if self.config.prediction_type == "epsilon":
            x0, eps = (x - sigma * out) / max(alpha, ALPHA_MIN), out
        elif self.config.prediction_type == "v_prediction":
            x0, eps = alpha * x - sigma * out, alpha * out + sigma * x
        else:
            x0, eps = out, (x - alpha * out) / sigma
        if self.config.noise_correction and i == 0:
            eps = x
        prev = (alpha_next * x0 + sigma_next * eps).to(sample.dtype)
        if not return_dict:
            return (prev,)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(sample.dtype))

    def __len__(self) -> int:
        return self.config.num_train_timesteps
