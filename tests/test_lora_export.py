"""Export of a LoRA student (flash_jax/export.py, flash_jax/lora.py) to what diffusers loads.

Tiny SD1.5- and SDXL-shaped LoRA students train 2 steps; the export's LoRA file is loaded into
diffusers' own pipeline with `load_lora_weights`, and its latents are checked against flash-jax's
sampler from the same initial noise; so is the `--merge` export, and the file read back into
flash-jax gives the checkpoint's factors.
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from flash_jax import export, lora, sampling
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint, loop
from tests import tiny_sd
from tests.test_export import PROMPTS, pipeline_latents, student_config, write_teacher

pytest.importorskip("torch")  # diffusers runs on it
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

NUM_STEPS = 3


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tmp_path_factory):
    """(kind, config, workdir) of a 2-step LoRA student run on attention, FF and resnet convs; a
    large learning rate and no EMA averaging, so 2 steps move the student visibly off the
    teacher (the export's latents would otherwise match the teacher's too)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"lora_export_{kind}")
    config = student_config(kind, write_teacher(root / "teacher", kind))
    with config.unlocked():
        config.lora.update(
            enabled=True, rank=4, alpha=8.0, targets=("attention", "feed_forward", "resnet")
        )
        config.optimizer.update(learning_rate=1e-2, warmup_steps=1)
        config.ema_decay = 0.0
    loop.train(config, root / "run")
    return kind, config, root / "run"


def flash_latents(config, unet, x_T):
    """Final latents of the run's sampler (`config.sample`, NUM_STEPS) with UNet params `unet`."""
    model = T2I.from_config(config)
    text = model.load_pretrained(("text",))["text"]
    context = jax.jit(model.encode_text)(text, model.tokenizer()(PROMPTS))
    sampler = dataclasses.replace(
        sampling.SamplerConfig(**config.sample.to_dict()), num_steps=NUM_STEPS
    )
    return np.asarray(
        sampling.sample(model.apply_unet, unet, x_T, model.schedule, sampler, cond=context)
    )


def diffusers_latents(kind, folder, x_T, load_lora):
    cls = (
        diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    )
    pipe = cls.from_pretrained(folder, trust_remote_code=True)
    if load_lora:
        pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipeline_latents(pipe, x_T, NUM_STEPS)


@pytest.mark.slow  # trains (compiles) two tiny LoRA students: ~2-5 min on 2 cores
def test_diffusers_load_lora_weights_reproduces_the_student(trained, tmp_path, modules_cache):
    kind, config, workdir = trained
    model = T2I.from_config(config)
    teacher = Path(config.model.pretrained)
    base = model.load_pretrained(("unet",))["unet"]
    factors = checkpoint.load_params(workdir)["unet"]
    student = lora.full_unet(factors, config, lambda: base)
    x_T = jax.random.normal(jax.random.PRNGKey(0), model.latent_shape(2, tiny_sd.IMAGE_SIZE))
    ours = flash_latents(config, student, x_T)
    # The factors matter: the student's latents are not the teacher's.
    assert np.abs(ours - flash_latents(config, base, x_T)).max() > 1e-2

    out = export.export(workdir, tmp_path / "lora")
    assert (out / lora.PEFT_FILE).is_file()
    for f in (teacher / "unet").iterdir():  # the base, unchanged
        assert (out / "unet" / f.name).read_bytes() == f.read_bytes()
    ref = diffusers_latents(kind, out, x_T, load_lora=True)
    np.testing.assert_allclose(ref, ours, rtol=0, atol=1e-4)

    # Read back into flash-jax: the checkpoint's factors, rank and alpha.
    back, back_config = lora.load_peft(str(out / lora.PEFT_FILE), base)
    assert (back_config.rank, back_config.alpha) == (4, 8.0)
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])  # noqa: E731
    assert flat(back).keys() == flat(factors["lora"]).keys()
    for path, value in flat(factors["lora"]).items():
        np.testing.assert_array_equal(flat(back)[path], value)

    merged = export.export(workdir, tmp_path / "merged", merge=True)
    assert not (merged / lora.PEFT_FILE).exists()
    ref = diffusers_latents(kind, merged, x_T, load_lora=False)
    np.testing.assert_allclose(ref, ours, rtol=0, atol=1e-4)


def test_merge_of_a_full_student_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_sd.write_pipeline(teacher, "sd15")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(student_config("sd15", teacher).to_json())
    with pytest.raises(
        export.ExportError, match=r"--merge: .* full student \(config.lora.enabled is off\)"
    ):
        export.export(tmp_path / "run", tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()
