"""Export of a distilled student as a diffusers folder (flash_jax/export.py) and the diffusers
scheduler that reproduces its sampler (flash_jax/diffusers_scheduler.py).

The end-to-end test trains tiny SD1.5- and SDXL-shaped students for 2 steps, exports them, loads
each folder with diffusers' own pipeline and checks its final latents against flash-jax's sampler
from the same initial noise. The scheduler's step rule is also checked on a closed-form model for
every prediction type, and every refusal of the export is a test.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.sd import sd15_imagine_flash, sdxl_imagine_flash
from flash_jax import diffusion, export, sampling, weights
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint, loop
from tests import tiny_sd

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from flash_jax.diffusers_scheduler import ImagineFlashScheduler  # noqa: E402  (needs torch)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "photo of a blue dog"]


def student_config(kind: str, teacher: Path) -> ml_collections.ConfigDict:
    """configs/sd's Imagine Flash config with the tiny `kind` model of `teacher`: 2 steps of a
    1-step student on 16 px testbed images, no discriminator (the cheapest compile)."""
    dicts = tiny_sd.model_dicts(kind)
    config = (sdxl_imagine_flash if kind == "sdxl" else sd15_imagine_flash).get_config("1")
    with config.unlocked():
        for part, value in dicts.items():
            config.model[part] = value
        config.model.update(pretrained=str(teacher), dtype="float32", remat=False)
        config.data.update(source="shapes", data_dir="", image_size=tiny_sd.IMAGE_SIZE)
        config.update(batch_size=2, total_steps=2, checkpoint_every=2, num_samples=2)
        config.imagine_flash.update(teacher_steps=1, adv_weight=0.0)
    return config


def write_teacher(folder: Path, kind: str) -> Path:
    """The tiny teacher folder; SD1.5's with a Hub-style model_index.json and scheduler/ (SDXL's
    has neither: export writes its model_index.json)."""
    tiny_sd.write_pipeline(folder, kind)
    if kind == "sd15":
        diffusers.DDIMScheduler(steps_offset=1).save_pretrained(folder / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tmp_path_factory):
    """(kind, config, workdir) of a 2-step student run."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"export_{kind}")
    config = student_config(kind, write_teacher(root / "teacher", kind))
    loop.train(config, root / "run")
    return kind, config, root / "run"


def student_sampler(config, workdir, x_T):
    """`(num_steps, noise_correction) -> final latents` of the run's own sampler (`config.sample`
    at those settings) from `x_T` for `PROMPTS`, with its EMA UNet and the teacher's text."""
    model = T2I.from_config(config)
    unet = checkpoint.load_params(workdir)["unet"]
    text = model.load_pretrained(("text",))["text"]
    context = jax.jit(model.encode_text)(text, model.tokenizer()(PROMPTS))
    base = sampling.SamplerConfig(**config.sample.to_dict())

    def latents(num_steps, noise_correction):
        sampler = dataclasses.replace(base, num_steps=num_steps, noise_correction=noise_correction)
        return np.asarray(
            sampling.sample(model.apply_unet, unet, x_T, model.schedule, sampler, cond=context)
        )

    return latents


def pipeline_latents(pipe, x_T, num_steps: int) -> np.ndarray:
    """Final latents `(B, h, w, c)` of a diffusers pipeline for PROMPTS from `x_T` (NHWC), no CFG."""
    with torch.no_grad():
        out = pipe(
            PROMPTS,
            num_inference_steps=num_steps,
            guidance_scale=1.0,
            height=tiny_sd.IMAGE_SIZE,
            width=tiny_sd.IMAGE_SIZE,
            latents=torch.tensor(np.asarray(x_T)).permute(0, 3, 1, 2),
            output_type="latent",
        ).images
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.slow  # trains (compiles) two tiny students: the module takes 1.5-5 min on 2 cores
def test_diffusers_pipeline_reproduces_the_student(trained, tmp_path, modules_cache):
    kind, config, workdir = trained
    out = export.export(workdir, tmp_path / "student")
    teacher = Path(config.model.pretrained)
    copied = {"vae", "text_encoder", "tokenizer"} | (
        {"text_encoder_2", "tokenizer_2"} if kind == "sdxl" else set()
    )
    assert {p.name for p in out.iterdir()} == copied | {"unet", "scheduler", "model_index.json"}
    for name in copied:  # the teacher's components, unchanged
        for f in (teacher / name).iterdir():
            assert (out / name / f.name).read_bytes() == f.read_bytes()
    assert not list(tmp_path.glob(".*partial"))

    cls = (
        diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    )
    pipe = cls.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "ImagineFlashScheduler"
    assert pipe.scheduler.config.noise_correction  # the run's config.sample
    pipe.set_progress_bar_config(disable=True)
    model = T2I.from_config(config)
    x_T = jax.random.normal(jax.random.PRNGKey(0), model.latent_shape(2, tiny_sd.IMAGE_SIZE))
    student = student_sampler(config, workdir, x_T)
    results = {}
    for num_steps in (1, 3):
        for nc in (False, True):
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, noise_correction=nc
            )
            ours = student(num_steps, nc)
            ref = pipeline_latents(pipe, x_T, num_steps)
            np.testing.assert_allclose(ref, ours, rtol=0, atol=1e-4)
            results[num_steps, nc] = ours
    # Noise correction is exercised: it changes 3 steps (not 1: the last step has σ_next = 0).
    np.testing.assert_array_equal(results[1, False], results[1, True])
    assert np.abs(results[3, False] - results[3, True]).max() > 1.0


@pytest.mark.slow  # reuses the SD1.5 student; `--mode sample` compiles the sampler
@pytest.mark.parametrize("trained", ["sd15"], indirect=True)  # the same for every model
def test_command_line_export_and_sample(trained, tmp_path):
    _, config, workdir = trained
    cache = ["--compilation_cache", jax.config.jax_compilation_cache_dir]  # conftest's
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "flash_jax.main", "--workdir", str(workdir), *cache, *args],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    done = run(
        "--mode", "export", "--out", str(tmp_path / "half"), "--dtype", "fp16", "--params", "raw"
    )
    assert done.returncode == 0, done.stderr
    from safetensors.numpy import load_file

    state = load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")
    raw = checkpoint.load_params(workdir, "params")["unet"]
    expected = weights.unet_to_diffusers(raw, T2I.from_config(config).unet)
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert state[name].dtype == np.float16
        np.testing.assert_array_equal(state[name], value.astype(np.float16))
    again = run("--mode", "export", "--out", str(tmp_path / "half"))
    assert again.returncode != 0 and "is not an empty folder" in again.stderr

    # --mode sample without --config: the run's config.json; a grid and one PNG per prompt.
    png = tmp_path / "grid.png"
    done = run(
        "--mode", "sample", "--prompts", ";".join(PROMPTS), "--steps", "1", "--out", str(png)
    )
    assert done.returncode == 0, done.stderr
    assert png.is_file()
    assert sorted(p.name for p in tmp_path.glob("grid_*.png")) == ["grid_0.png", "grid_1.png"]


# ------------------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A workdir with the SD1.5 student's config.json and no checkpoint (export checks first)."""
    root = tmp_path_factory.mktemp("fake_run")
    teacher = root / "teacher"
    tiny_sd.write_pipeline(teacher, "sd15")
    config = student_config("sd15", teacher)
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(config.to_json())
    return root / "run", config


def with_config(tmp_path, config, **changes) -> Path:
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (tmp_path / "run").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(config.to_json())
    return tmp_path / "run"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "denoising"}, r"config.method='denoising' run, not a student"),
        ({"model.pretrained": ""}, r"config.model.pretrained is empty"),
        ({"model.pretrained": "/nonexistent"}, r"pretrained='/nonexistent' is not a folder"),
        ({"sample.name": "dpmpp_2m"}, r"config.sample.name='dpmpp_2m'"),
        ({"sample.eta": 1.0}, r"config.sample.eta=1.0"),
        ({"sample.spacing": "leading"}, r"config.sample.spacing='leading'"),
    ],
)
def test_export_refuses_runs_it_cannot_reproduce(fake_run, tmp_path, changes, message):
    workdir = with_config(tmp_path, fake_run[1], **changes)
    with pytest.raises(export.ExportError, match=message):
        export.export(workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_bad_arguments_and_leaves_nothing(fake_run, tmp_path):
    workdir, config = fake_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(export.ExportError, match="exists and is not an empty folder"):
        export.export(workdir, tmp_path / "full")
    with pytest.raises(export.ExportError, match=r"--dtype='fp8'"):
        export.export(workdir, tmp_path / "out", dtype="fp8")
    with pytest.raises(export.ExportError, match=r"--params='best'"):
        export.export(workdir, tmp_path / "out", params="best")
    with pytest.raises(FileNotFoundError, match="not a training run"):
        export.export(tmp_path, tmp_path / "out")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints"):
        export.export(workdir, tmp_path / "out")
    (tmp_path / "empty").mkdir()  # an empty --out is fine until the checkpoint is missing
    with pytest.raises(checkpoint.CheckpointError):
        export.export(workdir, tmp_path / "empty")
    assert not (tmp_path / "out").exists() and not any((tmp_path / "empty").iterdir())
    assert not list(tmp_path.glob(".*partial"))

    broken = tmp_path / "teacher"
    tiny_sd.write_pipeline(broken, "sd15")
    (broken / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"],
                                                          "safety_checker": ["x", "y"]}))  # fmt: skip
    workdir = with_config(tmp_path / "mi", config, **{"model.pretrained": str(broken)})
    with pytest.raises(export.ExportError, match=r"has no \['safety_checker'\]"):
        export.export(workdir, tmp_path / "out")


def test_export_refuses_weights_that_overflow_the_dtype(fake_run, tmp_path, monkeypatch):
    workdir, config = fake_run
    abstract = weights.model_abstract("unet", T2I.from_config(config).unet)
    unet = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    unet["conv_in"]["bias"][0] = 1e5  # finite in float32 and bfloat16, inf in float16
    monkeypatch.setattr(checkpoint, "load_params", lambda *_: {"unet": unet})
    with pytest.raises(export.ExportError, match=r"non-finite weights in --dtype fp16: \['conv_in"):
        export.export(workdir, tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))
    export.export(workdir, tmp_path / "out", dtype="bf16")  # writes; the copy is checked above
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# ------------------------------------------------------------------------------ scheduler


def linear_model(params, x, t, context):
    """A closed-form 'model' whose output depends on x and t: enough to test the step rule."""
    del context
    return params["a"] * x + params["b"] * (t / 1000.0)[:, None, None, None]


@pytest.mark.parametrize(
    "prediction_type, final_alpha_one, num_steps, name",
    [
        ("epsilon", True, 3, "ddim"),
        ("v_prediction", True, 3, "ddim"),
        ("sample", True, 3, "ddim"),
        ("epsilon", False, 2, "ddim"),
        ("epsilon", True, 3, "euler"),  # trailing Euler: DDIM's update on the same timesteps
    ],
)
@pytest.mark.parametrize("noise_correction", [False, True])
def test_scheduler_matches_the_flash_jax_sampler(
    prediction_type, final_alpha_one, num_steps, name, noise_correction
):
    schedule = diffusion.make_schedule(prediction_type=prediction_type)
    sampler = sampling.SamplerConfig(
        name=name,
        num_steps=num_steps,
        noise_correction=noise_correction,
        final_alpha_one=final_alpha_one,
    )
    params = {"a": jnp.float32(0.3), "b": jnp.float32(-0.7)}
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    ours = sampling.sample(linear_model, params, x_T, schedule, sampler)

    scheduler = ImagineFlashScheduler(
        prediction_type=prediction_type,
        set_alpha_to_one=final_alpha_one,
        noise_correction=noise_correction,
    )
    scheduler.set_timesteps(num_steps)
    np.testing.assert_array_equal(
        scheduler.timesteps.numpy(), diffusion.timesteps_for(1000, num_steps, "trailing")
    )
    x = torch.tensor(np.asarray(x_T)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_batch = torch.full((2,), float(t))
        out = (
            0.3 * scheduler.scale_model_input(x, t) - 0.7 * (t_batch / 1000.0)[:, None, None, None]
        )
        x = scheduler.step(out, t, x).prev_sample
    np.testing.assert_allclose(x.numpy(), ours, rtol=1e-5, atol=1e-5)


def test_scheduler_schedule_and_errors():
    flash = diffusion.make_schedule(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    scheduler = ImagineFlashScheduler(rescale_betas_zero_snr=True)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), flash.alphas_cumprod, atol=1e-6)
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(torch.zeros(1), 999, torch.zeros(1))
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match=r"timestep 500 is not one of \[999, 666, 332\]"):
        scheduler.step(torch.zeros(1), 500, torch.zeros(1))
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        ImagineFlashScheduler(prediction_type="x0")
