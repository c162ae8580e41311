"""The testbed's Table 1 and ablation table (docs/method.md, "The paper's numbers"): every method
on the same teacher, with the same budget, five training seeds each, evaluated on the same
2000 prompts per prompt set and the same noise, each row's difference to Imagine Flash at 3 steps
with its paired bootstrap 95 % interval (flash_jax/eval/paired.py), and the paper's four claims
judged from those intervals (`claims`).

Two functions over ONE list of runs (`RUNS` + the step-distillation chain), with the same
argument `arg`: comma-separated "tiny" (tiny models, 2 updates: a smoke run of the whole sweep),
"seeds=N" (training seeds per method, default 5), "assets=DIR" (the frozen teacher.msgpack,
autoencoder.msgpack and judge.msgpack; default assets/shapes, the shipped trained testbed models;
tiny runs need tiny ones), "only=NAME+NAME" (just these runs of RUNS, "step_distill" for the step
distillation chain; the teacher is always evaluated). The evaluation keeps the rows already in its
results.json, so `only=` runs add seeds or rows to the same tables.

`get_hyper(h)` (launch/sweep.py; `h.arg` is `arg`) -> the jobs, in dependency order: one training
job per run and seed (job fields `name` = its folder under the sweep's --workdir, `config`,
`after`; step distillation's stages each `after` the previous one, whose folder is their
`previous_workdir`), then the evaluation job (`mode` "eval", this file as config, the sweep's
--workdir as its workdir, after every training job):
    python launch/sweep.py --config configs/shapes/comparison.py[:arg] --workdir runs/comparison \
        [--launcher local|slurm|tpu_pod] [--dry-run]

`get_config(arg)` -> the evaluation config (`--mode eval`, flash_jax/eval/evaluate.py reads it):
  the same runs by name (their folders under --workdir), each at its step counts, plus the teacher.
    python -m flash_jax.main --mode eval --config configs/shapes/comparison.py --workdir runs/comparison

Rows: teacher (CFG) 25 and 3 steps; step distillation 4 (the chain guidance → 16 → 8 → 4, whose
four runs share one run's budget); ADD 4; LCM 1/2/3 (one student); Imagine Flash 1/2/3 (one
student per step count); the ablations at 3 steps: w/o noise correction, w/o discriminator,
w/o backward distillation, w/o SRL; the Imagine Flash 3-step students sampled without noise
correction (the paper's inference-time ablation, paired run by run); and the paper's SRL
re-noising with fresh noise ε', where the testbed default re-noises with the student's own ε̂ (a
deterministic target); and Imagine Flash 3 as LoRA students of rank 4, 16 and 64 on the frozen
teacher (alpha = rank), at the same updates and learning rate as the full student.
"""

from __future__ import annotations

import ml_collections

from configs import run
from configs.shapes import step_distill

DEFAULT_ASSETS = "assets/shapes"  # the shipped trained teacher, autoencoder and judge

# (label, name, config, evaluated step counts); every run is trained once per seed.
IMAGINE_FLASH = "configs/shapes/imagine_flash.py"
RUNS = (
    ("Imagine Flash", "if1", f"{IMAGINE_FLASH}:1", (1,)),
    ("Imagine Flash", "if2", f"{IMAGINE_FLASH}:2", (2,)),
    ("Imagine Flash", "if3", f"{IMAGINE_FLASH}:3", (3,)),
    ("IF w/o noise correction", "if3_no_nc", f"{IMAGINE_FLASH}:3,no_nc", (3,)),
    ("IF w/o discriminator", "if3_no_disc", f"{IMAGINE_FLASH}:3,no_disc", (3,)),
    ("IF w/o backward distillation", "if3_no_backward", f"{IMAGINE_FLASH}:3,no_backward", (3,)),
    ("IF w/o SRL", "if3_no_srl", f"{IMAGINE_FLASH}:3,no_srl", (3,)),
    ("IF, SRL with fresh noise (paper)", "if3_srl_fresh", f"{IMAGINE_FLASH}:3,srl_fresh", (3,)),
    ("IF, uniform loss", "if3_w_uniform", f"{IMAGINE_FLASH}:3,w_uniform", (3,)),
    ("IF, α-weighted loss", "if3_w_alpha", f"{IMAGINE_FLASH}:3,w_alpha", (3,)),
    ("IF LoRA, rank 4", "if3_lora4", f"{IMAGINE_FLASH}:3,lora=4", (3,)),
    ("IF LoRA, rank 16", "if3_lora16", f"{IMAGINE_FLASH}:3,lora=16", (3,)),
    ("IF LoRA, rank 64", "if3_lora64", f"{IMAGINE_FLASH}:3,lora=64", (3,)),
    ("ADD", "add", "configs/shapes/add.py", (4,)),
    ("LCM", "lcm", "configs/shapes/lcm.py", (1, 2, 3)),
)
REFERENCE_LABEL = "Imagine Flash"  # at 3 steps: the row the paired intervals are against
NC_OFF_LABEL = "IF, sampled w/o noise correction"
STEP_DISTILL = "configs/shapes/step_distill.py"
STEP_DISTILL_NAME = "step_distill"  # `only=` name of the chain; its runs: step_distill_<stage>_s<k>
NAMES = (*(name for _, name, _, _ in RUNS), STEP_DISTILL_NAME)  # what `only=` picks from
TEACHER_STEPS = (25, 3)


def _parse(arg: str) -> dict:
    """`{"tiny", "seeds", "assets", "only"}` from the comma-separated argument."""
    chosen, values = run.parse(
        arg, ("tiny",), "configs/shapes/comparison.py", ("seeds", "assets", "only")
    )
    out = dict(
        tiny="tiny" in chosen,
        seeds=int(values.get("seeds", 5)),
        assets=values.get("assets", DEFAULT_ASSETS),
        only=tuple(values["only"].split("+")) if "only" in values else NAMES,
    )
    if out["seeds"] < 1:
        raise ValueError(f"comparison config: seeds={out['seeds']} must be >= 1")
    unknown = set(out["only"]) - set(NAMES)
    if unknown:
        raise ValueError(
            f"comparison config: only= names {sorted(unknown)} not among {list(NAMES)}"
        )
    return out


def _chosen(a: dict) -> list[tuple]:
    """The entries of RUNS that `only=` keeps."""
    return [run for run in RUNS if run[1] in a["only"]]


def _with_tiny(config: str, tiny: bool) -> str:
    if not tiny:
        return config
    return f"{config},tiny" if ":" in config else f"{config}:tiny"


def evaluated_runs(arg: str = "") -> list[dict]:
    """Every evaluated run: `{"label", "name", "config", "steps"}`, seeds expanded (`name_s<k>`);
    step distillation is represented by its last stage."""
    a = _parse(arg)
    tiny = a["tiny"]
    out = []
    for seed in range(a["seeds"]):
        for label, name, config, steps in _chosen(a):
            out.append(
                dict(
                    label=label,
                    name=f"{name}_s{seed}",
                    config=_with_tiny(config, tiny),
                    steps=steps,
                    seed=seed,
                )
            )
            if name == "if3":  # the same students sampled without noise correction
                out.append(
                    dict(
                        label=NC_OFF_LABEL,
                        name=f"if3_nc_off_s{seed}",
                        workdir=f"if3_s{seed}",
                        config=_with_tiny(config, tiny),
                        steps=steps,
                        seed=seed,
                        overrides={"sample.noise_correction": False},
                    )
                )
        if STEP_DISTILL_NAME not in a["only"]:
            continue
        last = step_distill.CHAIN[-1]
        out.append(
            dict(
                label="Step distillation",
                name=f"{STEP_DISTILL_NAME}_{last}_s{seed}",
                config=_with_tiny(f"{STEP_DISTILL}:{last}", tiny),
                steps=(int(last),),
                seed=seed,
            )
        )
    return out


def get_hyper(h) -> list[dict]:
    """The sweep's jobs (launch/sweep.py): the training runs, then the evaluation."""
    a = _parse(h.arg)
    tiny = a["tiny"]
    shared = {
        "config.teacher_workdir": f"{a['assets']}/teacher.msgpack",
        "config.autoencoder_workdir": f"{a['assets']}/autoencoder.msgpack",
    }
    jobs = []
    for seed in range(a["seeds"]):
        seeded = shared | {"config.seed": seed, "config.data.shuffle_seed": seed}
        for _, name, config, _ in _chosen(a):
            jobs.append(dict(name=f"{name}_s{seed}", config=_with_tiny(config, tiny), **seeded))
        previous = None
        for stage in step_distill.CHAIN if STEP_DISTILL_NAME in a["only"] else ():
            job = dict(
                name=f"{STEP_DISTILL_NAME}_{stage}_s{seed}",
                config=_with_tiny(f"{STEP_DISTILL}:{stage}", tiny),
                **seeded,
            )
            if previous:
                job["after"] = (previous,)
                job["config.step_distill.previous_workdir"] = f"{{workdir}}/{previous}"
            jobs.append(job)
            previous = job["name"]
    only = [] if a["only"] == NAMES else ["only=" + "+".join(a["only"])]
    variant = ",".join(["tiny"] * tiny + [f"seeds={a['seeds']}", f"assets={a['assets']}", *only])
    evaluation = dict(
        name="evaluate",
        config=f"configs/shapes/comparison.py:{variant}",
        workdir="{workdir}",
        mode="eval",
        after=tuple(j["name"] for j in jobs),
    )
    return [*jobs, evaluation]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The evaluation config of the comparison (`--mode eval --workdir <root>`)."""
    a = _parse(arg)
    tiny = a["tiny"]
    c = ml_collections.ConfigDict()
    c.judge = f"{a['assets']}/judge.msgpack"  # judge run directory or params file
    c.num_images = 2000  # prompts per prompt set (one image per prompt and noise seed)
    c.prompt_sets = ("eval", "heldout")  # Shapes splits: seen / held-out attribute combinations
    c.noise_seeds = (0, 1)  # initial-noise seeds (diversity is measured across them)
    c.data_seed = 0  # Shapes generator seed of the prompts and real images
    c.image_size = 32  # image side; every run must generate this size
    c.batch_size = 50  # images per generate call
    c.grid_prompts = 8  # prompts (columns) in the side-by-side sample grids
    c.plot_metrics = ("fd_judge", "mean", "chroma", "diversity")  # plotted against steps
    c.out_dir = "evaluation"  # output folder under --workdir
    c.reference = f"{REFERENCE_LABEL}@3"  # every row's paired interval is against this row
    c.teacher_reference = f"teacher@{TEACHER_STEPS[0]}"  # teacher-relative metrics' images
    c.num_resamples = 1000  # bootstrap resamples of the paired 95 % intervals
    # The paper's four claims: each component against the row trained (or sampled) without it.
    c.claims = {
        "backward distillation": "IF w/o backward distillation",
        "shifted reconstruction loss": "IF w/o SRL",
        "discriminator": "IF w/o discriminator",
        "noise correction": NC_OFF_LABEL,
    }
    teacher = dict(
        label="Teacher (CFG)",
        name="teacher",
        workdir=f"{a['assets']}/teacher.msgpack",
        config="configs/shapes/teacher.py" + (":tiny" if tiny else ""),
        steps=TEACHER_STEPS,
        overrides={"autoencoder_workdir": f"{a['assets']}/autoencoder.msgpack"},
    )
    trained = [
        dict(workdir=r["name"]) | {k: v for k, v in r.items() if k != "config"}
        for r in evaluated_runs(arg)
    ]
    c.runs = [teacher, *trained]
    if not any(r["label"] == REFERENCE_LABEL for r in trained):
        c.reference = ""  # no Imagine Flash 3-step row chosen: no paired intervals
    if tiny:
        c.num_images, c.image_size, c.batch_size, c.grid_prompts = 4, 16, 4, 4
        c.num_resamples = 20
    c.lock()
    return c
