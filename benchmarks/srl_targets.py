"""How good is the target Imagine Flash regresses its student to? SRL's target against plain
backward distillation's, scored like generated images.

  python -m benchmarks.srl_targets                                   # the student at step 0
  python -m benchmarks.srl_targets --student runs/comparison/if3_s0  # a trained student
  python -m benchmarks.srl_targets --config configs/shapes/imagine_flash.py:3,srl_fresh  # ε' fresh
  python -m benchmarks.srl_targets --set imagine_flash.gamma_a=0.9   # another γ
  python -m benchmarks.srl_targets --draws 1                        # one ε' draw, not the mean

For each student timestep t of the N-step student (`--config`, default the 3-step testbed
config on the shipped 8x8 teacher), on `--num-images` eval prompts with fixed noise:
  x_t       the student's own rollout from x_T to t (as in training, noise correction per config)
  student   x̂0^Θ(x_t, t), the student's estimate (what the loss moves)
  SRL       the teacher's k-step CFG solve from α_{t_Φ}·x̂0^Θ + σ_{t_Φ}·ε' at t_Φ = γ(t), ε' as
            `imagine_flash.srl_noise` says (the student's own ε̂, the initial noise x_T, or fresh
            noise); with fresh noise the mean over `--draws` draws of ε' (the latent an L2 loss
            regresses to), not one draw
  plain     the teacher's k-step CFG solve from x_t at t (the `no_srl` ablation's target)
each decoded and scored with the shipped judge (FD-judge, mean alignment, chroma). A target
worse than the student's own estimate pulls the student down. Writes srl_targets.json to $OUT if
set, else --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from flash_jax import config as flash_config
from flash_jax.eval import generation, judge, scoring
from flash_jax.frozen import load_autoencoder
from flash_jax.methods import common as method_common
from flash_jax.methods import imagine_flash
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "shapes"
SHOWN = ("fd_judge", "mean", "chroma")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes/imagine_flash.py:3", help="path[:variant]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--teacher", default=str(ASSETS / "teacher.msgpack"))
    p.add_argument("--autoencoder", default=str(ASSETS / "autoencoder.msgpack"))
    p.add_argument("--student", default="", help="a student run (workdir); default: the teacher")
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="noise seed of x_T and the re-noising")
    p.add_argument("--draws", type=int, default=16, help="fresh-noise ε' draws averaged (SRL)")
    p.add_argument("--out", default=str(common.RESULTS / "srl_targets"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = flash_config.load_config_file(args.config)
    flash_config.apply_overrides(config, args.set)
    flash_config.set_dotted(config, "teacher_workdir", args.teacher)
    flash_config.set_dotted(config, "autoencoder_workdir", args.autoencoder)
    ifc = imagine_flash.ImagineFlashConfig(**config.imagine_flash.to_dict())
    if len(ifc.student_steps) != 1:
        raise ValueError(f"imagine_flash.student_steps={ifc.student_steps}: give one step count")
    n = ifc.student_steps[0]
    model = T2I.from_config(config)
    teacher = checkpoint.load_params(args.teacher)
    student = checkpoint.load_params(args.student)["unet"] if args.student else teacher["unet"]
    vae = load_autoencoder(config, model)
    judge_params, judge_config = judge.load_judge(ASSETS / "judge.msgpack")
    size = config.data.image_size
    prompts = scoring.load_prompt_set("eval", args.num_images, 0, size, judge_params, judge_config)
    tokens = jnp.asarray(model.tokenizer()(prompts.captions))
    empty = model.tokenizer()([""])[0]
    plans, ts_table = imagine_flash.student_plans(
        model.schedule, (n,), ifc.rollout_noise_correction
    )
    plain = dataclasses.replace(ifc, srl=False)
    if args.draws < 1:
        raise ValueError(f"--draws={args.draws} must be >= 1")
    draws = args.draws if ifc.srl_noise == "fresh" else 1  # the other ε' are deterministic

    @jax.jit
    def images(student, teacher, tokens, x_T, i, rng):
        """(student x̂0, SRL target, plain target) as uint8 images, all at rollout depth `i`, and
        the SRL target's t_Φ `(B,)`."""
        b = tokens.shape[0]
        context, _, uncond = method_common.conditioning(
            model, teacher["text"], {"tokens": tokens}, empty
        )
        which, depth = jnp.zeros((b,), jnp.int32), jnp.full((b,), i, jnp.int32)
        t = jnp.asarray(ts_table)[which, depth]
        x_t = imagine_flash.rollout(
            model, student, x_T, plans, which, depth, context, ifc.rollout_noise_correction
        )
        x0 = method_common.predict_x0(model, model.apply_unet, student, x_t, t, context)[0]

        def target(key):
            return imagine_flash.srl_target(
                model, ifc, teacher["unet"], x0, x_t, t, context, uncond, key, x_T=x_T
            )

        srl, t_phi = jax.vmap(target)(jax.random.split(rng, draws))
        srl, t_phi = srl.mean(axis=0), t_phi[0]  # the L2 optimum: the mean over ε'
        no_srl, _ = imagine_flash.srl_target(
            model, plain, teacher["unet"], x0, x_t, t, context, uncond, rng
        )
        return tuple(model.to_images(vae, z) for z in (x0, srl, no_srl)), t_phi

    latent_shape = model.latent_shape(1, size)[1:]
    x_T = generation.initial_noise(args.seed, 0, args.num_images, latent_shape)
    rows, t_phi = [], []
    for i in range(n):
        out = [[], [], []]
        for start in range(0, args.num_images, 50):
            batch = slice(start, start + 50)
            rng = jax.random.fold_in(jax.random.key(args.seed), start)
            parts, t_phi_i = images(student, teacher, tokens[batch], x_T[batch], i, rng)
            for part, im in zip(out, parts, strict=True):
                part.append(np.asarray(im))
        for name, parts in zip(("student", "SRL", "plain"), out, strict=True):
            row = scoring.score(
                np.concatenate(parts),
                prompts.labels,
                judge_params,
                judge_config,
                prompts.real_features,
            )
            rows.append({"t": int(ts_table[0, i]), "what": name, **row})
        t_phi.append(int(t_phi_i[0]))  # no jitter: the same for every image of this t
    result = {
        **common.platform_info(),
        "config": args.config,
        "overrides": args.set,
        "student": args.student or "the teacher (step 0)",
        "num_images": args.num_images,
        "srl_draws": draws,
        "t_phi": t_phi,
        "rows": rows,
    }
    out_dir = Path(os.environ.get("OUT") or args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(result, "srl_targets.json", str(out_dir / "srl_targets.json"))
    print(f"student {result['student']}; t_Φ = γ(t) = {result['t_phi']}")
    print(
        "| t | " + " | ".join(f"{w} {m}" for w in ("student", "SRL", "plain") for m in SHOWN) + " |"
    )
    print("|---" * (1 + 3 * len(SHOWN)) + "|")
    for i in range(n):
        cells = [f"{rows[3 * i + j][m]:.3f}" for j in range(3) for m in SHOWN]
        print(f"| {rows[3 * i]['t']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
