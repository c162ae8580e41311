"""A distilled student as a diffusers pipeline folder (`python -m flash_jax.main --mode export`).

  python -m flash_jax.main --mode export --workdir RUN --out DIR [--params ema|raw] [--dtype fp32] \
      [--merge]

`RUN` is an Imagine Flash run of a diffusers model (`config.model.pretrained` names its teacher
folder). `DIR` receives:

  unet/              the student: config.json + diffusion_pytorch_model.safetensors (--dtype)
  scheduler/         `ImagineFlashScheduler` (flash_jax/diffusers_scheduler.py, copied there as
                     flash_jax_scheduler.py) configured as the run's `config.sample`: trailing
                     DDIM steps, initial noise x_T unscaled, noise correction on the first step
  vae/, text_encoder/, tokenizer/ (SDXL: text_encoder_2/, tokenizer_2/), ...
                     copied from the teacher folder
  model_index.json   the teacher's, its scheduler entry pointing at the file above (written for
                     SD / SDXL when the teacher folder has none)

A LoRA student (`config.lora.enabled`, flash_jax/lora.py) instead gets

  pytorch_lora_weights.safetensors
                     its factors in peft's names and layouts, the rank and alpha in the header:
                     what `pipe.load_lora_weights(DIR)` reads (--dtype applies)
  unet/              the teacher's, copied (the base the factors go on)

or, with `--merge`, `unet/` is the student with its factors merged in and no LoRA file is written
(the folder is then like a full student's).

and loads with `StableDiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` (SDXL:
`StableDiffusionXLPipeline`), followed for a LoRA student by `pipe.load_lora_weights(DIR)`;
docs/stable_diffusion.md. Every check runs before the checkpoint is
read; the folder is written under a temporary name next to `DIR` and renamed at the end, so a
failed export leaves no folder that looks complete.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from flash_jax import config as flash_config
from flash_jax import diffusion, lora, weights
from flash_jax.config import ConfigError
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint

if TYPE_CHECKING:
    import ml_collections

PARAMS = {"ema": "ema_params", "raw": "params"}  # --params -> checkpoint field
DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": jnp.bfloat16}
STUDENT_METHODS = ("imagine_flash",)
SCHEDULER_SOURCE = Path(__file__).with_name("diffusers_scheduler.py")
SCHEDULER_MODULE = "flash_jax_scheduler"  # scheduler/<this>.py in the exported folder
SCHEDULER_CLASS = "ImagineFlashScheduler"
_SD_COMPONENTS = {  # model_index.json entries when the teacher folder has none
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}
_SDXL_COMPONENTS = {
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}


class ExportError(ValueError):
    """The run or the output folder cannot give a faithful diffusers pipeline."""


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run was trained with (`workdir/config.json`, written by the trainer)."""
    import ml_collections

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({workdir} is not a training run's workdir)")
    return ml_collections.ConfigDict(flash_config.read_json(path))


def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`scheduler_config.json` of `ImagineFlashScheduler` reproducing the run's `config.sample`
    on its `config.schedule`.

    Raises:
      ExportError: `config.sample` is a sampler the scheduler does not reproduce (DPM-Solver++,
        η > 0, non-trailing spacing; trailing Euler is DDIM's update on the same timesteps).
    """
    sample = config.sample
    problems = []
    if sample.get("name", "ddim") not in ("ddim", "euler"):
        problems.append(f"config.sample.name={sample.name!r} (export takes 'ddim' or 'euler')")
    if sample.get("spacing", "trailing") != "trailing":
        problems.append(f"config.sample.spacing={sample.spacing!r} (the student's is 'trailing')")
    if sample.get("eta", 0.0) != 0.0:
        problems.append(f"config.sample.eta={sample.eta} (export takes deterministic DDIM, eta=0)")
    if problems:
        raise ExportError(
            "the run's sampler has no diffusers equivalent:\n  " + "\n  ".join(problems)
        )
    defaults = {
        k: p.default
        for k, p in inspect.signature(diffusion.make_schedule).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {
        "_class_name": SCHEDULER_CLASS,
        **defaults,
        **config.schedule.to_dict(),
        "set_alpha_to_one": bool(sample.get("final_alpha_one", True)),
        "noise_correction": bool(sample.get("noise_correction", False)),
    }


def model_index(teacher: Path, model: T2I) -> dict[str, Any]:
    """The exported `model_index.json`: the teacher's (or a written SD / SDXL one) with the
    scheduler entry replaced."""
    path = teacher / "model_index.json"
    if path.is_file():
        index = json.loads(path.read_text())
    else:
        sdxl = model.text_2 is not None
        index = {
            "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
            **_SD_COMPONENTS,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": None,
        }
        if sdxl:
            index |= {
                **_SDXL_COMPONENTS,
                "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
            }
        else:
            index |= {
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
    index["scheduler"] = [SCHEDULER_MODULE, SCHEDULER_CLASS]
    return index


def components(index: dict[str, Any]) -> list[str]:
    """The folders a pipeline loads besides unet/ and scheduler/ (entries with a library)."""
    return [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and name not in ("unet", "scheduler")
        and isinstance(value, list)
        and value[0] is not None
    ]


def check_run(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[T2I, Path]:
    """`(model, teacher folder)` of a run that can be exported; ExportError naming the config
    key otherwise."""
    if config.get("method") not in STUDENT_METHODS:
        raise ExportError(
            f"{workdir} is a config.method={config.get('method')!r} run, not a student: export "
            f"takes {', '.join(STUDENT_METHODS)} runs"
        )
    teacher = config.model.get("pretrained", "")
    if not teacher:
        raise ExportError(
            f"{workdir}: config.model.pretrained is empty (a testbed run): export needs the "
            "diffusers folder the student was distilled from"
        )
    teacher = Path(teacher)
    if not teacher.is_dir():
        raise ExportError(f"config.model.pretrained={str(teacher)!r} is not a folder")
    return T2I.from_config(config), teacher


def _cast(state: dict[str, np.ndarray], dtype: str, what: str) -> dict[str, np.ndarray]:
    """`state` in `dtype`; ExportError naming the tensors that overflow it."""
    with np.errstate(over="ignore"):  # checked next, naming the tensors
        state = {k: np.ascontiguousarray(v, DTYPES[dtype]) for k, v in state.items()}
    bad = [k for k, v in state.items() if not np.isfinite(v.astype(np.float32)).all()]
    if bad:
        raise ExportError(
            f"the {what} has non-finite weights in --dtype {dtype}: {bad[:5]} "
            "(fp16 overflows past 65504: export bf16 or fp32)"
        )
    return state


def export(
    workdir: str | Path,
    out: str | Path,
    *,
    params: str = "ema",
    dtype: str = "fp32",
    merge: bool = False,
) -> Path:
    """Writes the student of `workdir` to the new diffusers folder `out` (module docstring).

    Args:
      workdir: the run directory (config.json + checkpoints/).
      out: the folder to create; it must not exist or be empty.
      params: "ema" (the EMA parameters, what flash-jax samples and evaluates) or "raw".
      dtype: the UNet (or LoRA) weights' dtype, "fp32", "fp16" or "bf16".
      merge: for a LoRA student, write its merged UNet to `unet/` instead of the LoRA file.

    Returns:
      `out`.

    Raises:
      ExportError: a bad argument, output folder, run or teacher folder (before any loading).
      checkpoint.CheckpointError: the run has no checkpoint.
      weights.WeightsError: the checkpoint's UNet does not match the run's config.
    """
    if params not in PARAMS:
        raise ExportError(f"--params={params!r}: one of {sorted(PARAMS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r}: one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder: choose a new one")
    config = run_config(workdir)
    model, teacher = check_run(config, workdir)
    try:
        lora_config = lora.from_config(config)
    except ConfigError as e:
        raise ExportError(f"{workdir}: {e}") from None
    if merge and lora_config is None:
        raise ExportError(
            f"--merge: {workdir} trained a full student (config.lora.enabled is off): its unet/ "
            "is written without it"
        )
    sched = scheduler_config(config)
    index = model_index(teacher, model)
    missing = [name for name in components(index) if not (teacher / name).is_dir()]
    if missing:
        raise ExportError(f"teacher folder {teacher} has no {missing} (listed in model_index)")

    unet = checkpoint.load_params(workdir, PARAMS[params])["unet"]
    state = lora_file = None  # None: the teacher's unet/ is copied
    if lora_config is not None and not merge:
        if set(unet) != {"lora"}:
            raise ExportError(f"{workdir}: the LoRA student has tensors besides its factors")
        lora_state, metadata = lora.to_peft(unet["lora"], lora_config)
        lora_file = (_cast(lora_state, dtype, "LoRA"), metadata)
    else:
        if lora_config is not None:
            base = model.load_pretrained(("unet",))["unet"]
            unet = lora.full_unet(unet, config, lambda: base)
        state = _cast(weights.unet_to_diffusers(unet, model.unet), dtype, "UNet")

    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a failed export's leftovers
    try:
        _write(partial, teacher, index, model, state, sched, lora_file)
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _write(
    folder: Path,
    teacher: Path,
    index: dict,
    model: T2I,
    state: dict | None,
    sched: dict,
    lora_file: tuple[dict, dict] | None = None,
):
    from safetensors.numpy import save_file

    if state is None:
        shutil.copytree(teacher / "unet", folder / "unet")
    else:
        (folder / "unet").mkdir(parents=True)
        unet_config = {"_class_name": "UNet2DConditionModel", **model.unet.to_diffusers()}
        (folder / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2))
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        save_file(state, str(path), {"format": "pt"})
    if lora_file is not None:
        save_file(lora_file[0], str(folder / lora.PEFT_FILE), lora_file[1])
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    shutil.copyfile(SCHEDULER_SOURCE, folder / "scheduler" / f"{SCHEDULER_MODULE}.py")
    for name in components(index):
        shutil.copytree(teacher / name, folder / name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
