"""The testbed's Imagine Flash run: distil the teacher into a few-step student.

  python -m flash_jax.main --config configs/shapes/imagine_flash.py[:variants] \
      --workdir runs/shapes/if3 --config.teacher_workdir=runs/shapes/teacher \
      --config.autoencoder_workdir=runs/shapes/autoencoder
Variants (comma-separated): "1", "2", "3" (student steps; default 3), "all" (one student for 1/2/3),
the paper's ablations "no_nc", "no_disc", "no_backward", "no_srl"; "srl_fresh" (SRL re-noised
with fresh noise, as in the paper, instead of this testbed's default, the student's own ε̂:
docs/method.md, "Open points"); "srl_x_T" (re-noised with the sample's initial noise); "w_alpha",
"w_normalized" (the x̂0 loss weighted by α_t, or normalized per student step); "f2" (16x16x4
latents, for a teacher trained with configs/shapes/teacher.py:f2, e.g. the shipped
assets/shapes/teacher_f2.msgpack); and "quick" / "tiny".
"""

import dataclasses

import ml_collections

from configs.shapes import common, teacher
from flash_jax import sampling


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = common.variants(
        arg,
        (
            *(
                "1",
                "2",
                "3",
                "all",
                "no_nc",
                "no_disc",
                "no_backward",
                "no_srl",
                "srl_fresh",
                "srl_x_T",
                "w_alpha",
                "w_normalized",
            ),
            *("f2", "quick", "tiny"),
        ),
        "configs/shapes/imagine_flash.py",
    )
    base = teacher.get_config(",".join(variants & {"tiny", "f2"}))
    c = common.training(
        "imagine_flash", batch_size=16, total_steps=600, sample_every=200, ema_decay=0.99
    )
    c.model, c.schedule, c.data = base.model, base.schedule, base.data
    c.teacher_workdir = "runs/shapes/teacher"  # the trained stage-2 teacher (frozen)
    c.autoencoder_workdir = "runs/shapes/autoencoder"  # the trained stage-1 VAE (frozen)
    c.optimizer = common.optimizer(learning_rate=1e-4, warmup_steps=50)
    c.disc_optimizer = common.optimizer(learning_rate=1e-4, warmup_steps=50)
    c.imagine_flash = ml_collections.ConfigDict(
        dict(
            student_steps=[3],  # N; several values = one student serving all of them
            backward=True,  # backward distillation (False: forward-noised real latents)
            rollout_noise_correction=True,  # noise correction in the student's rollout
            srl=True,  # shifted reconstruction loss (False: plain backward distillation)
            gamma="affine",  # γ(t): "affine" a·t + b | "sd3" a·T·shift(t/T) + b
            gamma_a=0.75,  # γ slope (< 1 keeps γ(T) < T)
            gamma_b=0.0,  # γ offset
            gamma_shift=0.5,  # s of the "sd3" shift
            gamma_jitter=0.0,  # uniform ± jitter of t_Φ in timesteps
            # re-noising ε': "student" (its own ε̂: χ is deterministic) | "x_T" (the sample's initial
            # noise, the paper's equation) | "fresh" (the paper's diagram; with
            # it the target is mostly ε' at large t and the student regresses to the mean;
            # docs/method.md, "Open points")
            srl_noise="student",
            teacher_steps=2,  # k: teacher solve steps from t_Φ to 0
            teacher_sampler="ddim",  # "ddim" | "dpmpp_2m"
            guidance_scale=base.sample.guidance_scale,  # teacher CFG inside the solve
            guidance_rescale=0.0,  # teacher CFG rescale φ
            # x̂0 loss weight per sample: "uniform" | "alpha" (c(t) = α_t) | "normalized" (1 / the
            # batch's mean loss at the sample's student step: every step's term has mean 1)
            loss_weighting="uniform",
            adv_weight=0.1,  # λ_adv; 0 removes the discriminator
            disc_width=64,  # channels of each discriminator head
            disc_t_max=750,  # discriminator re-noising levels t_d ~ U[0, disc_t_max)
        )
    )
    for n in ("1", "2", "3"):
        if n in variants:
            c.imagine_flash.student_steps = [int(n)]
    if "all" in variants:
        c.imagine_flash.student_steps = [1, 2, 3]
    if "no_nc" in variants:
        c.imagine_flash.rollout_noise_correction = False
    if "no_disc" in variants:
        c.imagine_flash.adv_weight = 0.0
    if "no_backward" in variants:
        c.imagine_flash.backward = False
    if "no_srl" in variants:
        c.imagine_flash.srl = False
    if "srl_fresh" in variants:
        c.imagine_flash.srl_noise = "fresh"
    if "srl_x_T" in variants:
        c.imagine_flash.srl_noise = "x_T"
    for weighting in ("alpha", "normalized"):
        if f"w_{weighting}" in variants:
            c.imagine_flash.loss_weighting = weighting
    if "quick" in variants:
        c.total_steps, c.checkpoint_every, c.sample_every, c.log_every = 200, 200, 200, 10
    if "tiny" in variants:
        c.batch_size, c.total_steps, c.log_every = 2, 4, 1
        c.checkpoint_every, c.sample_every, c.num_samples = 2, 4, 2
        c.imagine_flash.teacher_steps = 1
        c.imagine_flash.disc_width = 8
    # The student's sampler (grids and evaluation; evaluation sets num_steps). The "no_nc"
    # ablation samples without noise correction too.
    c.sample = ml_collections.ConfigDict(
        dataclasses.asdict(
            sampling.SamplerConfig(
                num_steps=max(c.imagine_flash.student_steps),
                noise_correction=c.imagine_flash.rollout_noise_correction,
            )
        )
    )
    c.lock()
    return c


def get_hyper(h):
    """The paper's main ablation grid on the testbed: γ slope × adversarial weight (launch/sweep.py)."""
    return h.product(
        [
            h.sweep("config.imagine_flash.gamma_a", [0.5, 0.75, 0.9]),
            h.sweep("config.imagine_flash.adv_weight", [0.0, 0.1]),
        ]
    )
