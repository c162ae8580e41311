"""The testbed's Imagine Flash run: distil the teacher into a few-step student.

  python -m flash_jax.main --config configs/shapes/imagine_flash.py[:variants] \
      --workdir runs/shapes/if3 --config.teacher_workdir=runs/shapes/teacher \
      --config.autoencoder_workdir=runs/shapes/autoencoder
Variants (comma-separated): "1", "2", "3" (student steps; default 3), "all" (one student for 1/2/3),
the paper's ablations "no_nc", "no_disc", "no_backward", "no_srl"; "srl_fresh" (SRL re-noised
with fresh noise, as in the paper, instead of this testbed's default, the student's own ε̂:
docs/method.md, "Open points"); "srl_x_T" (re-noised with the sample's initial noise); "w_uniform",
"w_alpha", "w_normalized" (the x̂0 loss unweighted, weighted by α_t, or normalized per student step,
the default); "f2" (16x16x4
latents, for a teacher trained with configs/shapes/teacher.py:f2, e.g. the shipped
assets/shapes/teacher_f2.msgpack); "lora=R" (a LoRA student of rank R, alpha R, on the frozen
teacher); and "quick" / "tiny".
"""

import dataclasses

import ml_collections

from configs import run
from configs.shapes import teacher
from flash_jax import sampling
from flash_jax.methods.imagine_flash import ImagineFlashConfig


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants, values = run.parse(
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
                "w_uniform",
                "w_alpha",
                "w_normalized",
            ),
            *("f2", "quick", "tiny"),
        ),
        "configs/shapes/imagine_flash.py",
        ("lora",),
    )
    base = teacher.get_config(",".join(variants & {"tiny", "f2"}))
    c = run.training(
        "imagine_flash", batch_size=16, total_steps=600, sample_every=200, ema_decay=0.99
    )
    c.model, c.schedule, c.data = base.model, base.schedule, base.data
    c.teacher_workdir = "runs/shapes/teacher"  # the trained stage-2 teacher (frozen)
    c.autoencoder_workdir = "runs/shapes/autoencoder"  # the trained stage-1 VAE (frozen)
    c.optimizer = run.optimizer(learning_rate=1e-4, warmup_steps=50)
    c.disc_optimizer = run.optimizer(learning_rate=1e-4, warmup_steps=50)
    c.lora = run.lora()  # a LoRA student instead of a full one: --config.lora.enabled=true
    if "lora" in values:
        c.lora.enabled, c.lora.rank, c.lora.alpha = True, int(values["lora"]), float(values["lora"])
    knobs = dataclasses.asdict(
        ImagineFlashConfig(guidance_scale=base.sample.guidance_scale)  # the teacher's CFG scale
    )
    knobs["student_steps"] = list(knobs["student_steps"])
    c.imagine_flash = ml_collections.ConfigDict(knobs)  # ImagineFlashConfig documents each knob
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
    for weighting in ("uniform", "alpha", "normalized"):
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
