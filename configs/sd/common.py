"""Pieces shared by the Stable Diffusion configs: the published model configs and the run knobs.

Model dicts are the published diffusers / transformers `config.json` contents (bookkeeping keys
such as `_class_name`, `architectures`, `torch_dtype` left out) of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0; `t2i.T2I.load_pretrained` checks that the folder
given as `model.pretrained` has exactly these architectures. tests/test_sd_configs.py checks them
against the published values and parameter counts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections

from configs import run
from flash_jax import sampling
from flash_jax.methods.imagine_flash import ImagineFlashConfig

_SD_UNET_COMMON = dict(
    act_fn="silu",
    center_input_sample=False,
    class_embed_type=None,
    class_embeddings_concat=False,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_norm=None,
    downsample_padding=1,
    dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_only_cross_attention=None,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False,
    resnet_time_scale_shift="default",
    time_cond_proj_dim=None,
    time_embedding_act_fn=None,
    time_embedding_dim=None,
    time_embedding_type="positional",
    timestep_post_act=None,
)
_SD_BLOCKS = dict(
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)

SD15_UNET = dict(
    **_SD_UNET_COMMON,
    **_SD_BLOCKS,
    addition_embed_type=None,
    addition_embed_type_num_heads=64,
    attention_head_dim=8,
    cross_attention_dim=768,
    projection_class_embeddings_input_dim=None,
    sample_size=64,
    upcast_attention=None,
    use_linear_projection=False,
)
SD21_UNET = dict(
    **_SD_UNET_COMMON,
    **_SD_BLOCKS,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
)
SDXL_UNET = dict(
    **_SD_UNET_COMMON,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    attention_type="default",
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    dropout=0.0,
    num_attention_heads=None,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)

_CLIP_COMMON = dict(
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,  # transformers' legacy rule: pool at the largest id (<|endoftext|>)
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    model_type="clip_text_model",
    pad_token_id=1,
    vocab_size=49408,
)
CLIP_L_TEXT = dict(  # OpenAI CLIP ViT-L/14: SD1.x, SDXL's first encoder
    **_CLIP_COMMON,
    hidden_act="quick_gelu",
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
)
OPENCLIP_H_TEXT = dict(  # OpenCLIP ViT-H/14 without its last layer: SD2.x
    **_CLIP_COMMON,
    hidden_act="gelu",
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    projection_dim=512,
)
OPENCLIP_BIGG_TEXT = dict(  # OpenCLIP ViT-bigG/14 with projection: SDXL's text_encoder_2
    **_CLIP_COMMON,
    hidden_act="gelu",
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
)


def sd_vae(sample_size: int, scaling_factor: float = 0.18215, **extra) -> dict:
    """The SD AutoencoderKL (8x downsampling, 4 latent channels); SDXL's differs in scaling."""
    return dict(
        act_fn="silu",
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        in_channels=3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        out_channels=3,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        up_block_types=["UpDecoderBlock2D"] * 4,
        **extra,
    )


def schedule(prediction_type: str = "epsilon") -> ml_collections.ConfigDict:
    """SD's training noise schedule (scheduler_config.json: scaled_linear 0.00085..0.012)."""
    return ml_collections.ConfigDict(
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            rescale_betas_zero_snr=False,
            prediction_type=prediction_type,
        )
    )


# Where a diffusers pipeline folder keeps each architecture dict of `config.model`.
FOLDER_CONFIGS = {
    "unet": "unet/config.json",
    "text": "text_encoder/config.json",
    "text_2": "text_encoder_2/config.json",
    "autoencoder": "vae/config.json",
}


def folder_architecture(folder: str, parts: tuple[str, ...]) -> dict[str, dict]:
    """`{part: config.json dict}` of a diffusers pipeline folder for `parts` (keys of
    `FOLDER_CONFIGS`), without bookkeeping keys (`_class_name`, `_diffusers_version`, ...,
    `architectures`, `torch_dtype`, `transformers_version`).

    Raises:
      FileNotFoundError: a part's config.json is missing, naming it.
    """
    out = {}
    for part in parts:
        path = Path(folder) / FOLDER_CONFIGS[part]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (the folder's {part} architecture)")
        d = json.loads(path.read_text())
        skip = {"architectures", "torch_dtype", "transformers_version"}
        out[part] = {k: v for k, v in d.items() if not k.startswith("_") and k not in skip}
    return out


# Accelerator memory per chip (GiB) of the presets' 8-chip machines.
HBM_GIB = {"tpu_v5e_8": 16, "tpu_v4_8": 32, "gpu_8xh100": 80}


def preset(mesh: dict, batch_size: int, frozen_dtype: str = "bfloat16", remat: bool = True) -> dict:
    """A mesh / global batch / frozen-model dtype / remat preset for one of `HBM_GIB`'s machines,
    sized so the compiled step's per-device peak stays under 90 % of its memory (docs/scaling.md
    has the measured table, benchmarks/sd_state_size.py --presets measures it)."""
    return dict(
        mesh=dict(data=1, fsdp=1, tensor=1) | mesh,
        batch_size=batch_size,
        frozen_dtype=frozen_dtype,
        remat=remat,
    )


def imagine_flash(
    arg: str,
    config: str,
    *,
    unet: dict,
    text: dict,
    autoencoder: dict,
    guidance_scale: float,
    presets: dict[str, dict],
    prediction_type: str = "epsilon",
    text_2: dict | None = None,
) -> ml_collections.ConfigDict:
    """An Imagine Flash config for an SD model (variants: see the callers' docstrings; `config`:
    the calling file, for errors); `presets`: `{machine of HBM_GIB: preset(...)}`."""
    variants, values = run.parse(arg, ("1", "2", "3", "all", *HBM_GIB), config, ("folder",))
    folder = values.get("folder", "")
    machines = variants & set(HBM_GIB)
    if len(machines) > 1:
        raise ValueError(f"variants {sorted(machines)}: pick one machine preset")
    c = run.training(
        "imagine_flash",
        batch_size=64,  # global; 8 per device on 8 devices
        total_steps=20_000,
        log_every=50,
        checkpoint_every=1000,
        sample_every=1000,
        ema_decay=0.999,
    )
    c.model = ml_collections.ConfigDict(
        dict(
            unet=unet,
            text=text,
            autoencoder=autoencoder,
            pretrained="",  # REQUIRED: diffusers folder (unet/ vae/ text_encoder/ tokenizer/...)
            variant="",  # weight files there: "" (*.safetensors) or "fp16" (*.fp16.safetensors)
            dtype="bfloat16",  # UNet / text encoder compute dtype (params stay float32)
            remat=True,  # rematerialise UNet blocks: activations are the memory bottleneck
            attention_implementation="",  # "": JAX's choice | "xla" | "cudnn" | "per_head" (CPUs)
            force_zeros_for_empty_prompt=text_2 is not None,  # SDXL's model_index.json setting
        )
    )
    if text_2 is not None:
        c.model.text_2 = text_2
    if folder:  # the folder's own architecture instead of the published one
        parts = ("unet", "text", "autoencoder") + (("text_2",) if text_2 is not None else ())
        for part, d in folder_architecture(folder, parts).items():
            c.model[part] = ml_collections.ConfigDict(d)
        c.model.pretrained = folder
    c.schedule = schedule(prediction_type)
    c.data.source = "cache"  # latents + text embeddings from flash_jax.data.cache
    c.data.data_dir = ""  # REQUIRED: the cache directory (the cache job's --out)
    c.data.image_size = 0  # the cache's when training; the cache job: native (UNet sample_size x 8)
    c.teacher_workdir = ""  # unused: the teacher comes from model.pretrained
    c.autoencoder_workdir = ""  # unused: the VAE comes from model.pretrained
    c.optimizer = run.optimizer(learning_rate=1e-5, warmup_steps=500)
    c.disc_optimizer = run.optimizer(learning_rate=1e-5, warmup_steps=500)
    c.lora = run.lora()  # a LoRA student: --config.lora.enabled=true (docs/stable_diffusion.md)
    # The method's defaults (ImagineFlashConfig documents each knob) but for what differs at SD
    # scale.
    knobs = ImagineFlashConfig(
        teacher_steps=4,  # k: teacher solve steps from t_Φ to 0
        guidance_scale=guidance_scale,  # teacher CFG inside the solve (the model's usual scale)
        disc_width=256,  # channels of each discriminator head
        srl_noise="fresh",  # the paper's; the testbed's measurements chose "student" (docs/method.md)
    )
    c.imagine_flash = ml_collections.ConfigDict(dataclasses.asdict(knobs))
    for n in ("1", "2", "3"):
        if n in variants:
            c.imagine_flash.student_steps = (int(n),)
    if "all" in variants:
        c.imagine_flash.student_steps = (1, 2, 3)
    # Mesh (flash_jax/parallel.py): axis sizes, -1 fills the remaining devices. Batch is split
    # over data x fsdp; fsdp also shards params, optimizer state, EMA and the frozen teacher;
    # tensor shards heads and channels (activations too). The default, pure data parallelism,
    # needs a device that holds the whole training state and 8 images' activations: no 80 GB
    # chip does (docs/scaling.md); pick the preset of your machine.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    for machine in machines:
        p = presets[machine]
        c.mesh.update(p["mesh"])
        c.update(batch_size=p["batch_size"], frozen_dtype=p["frozen_dtype"])
        c.model.remat = p["remat"]
    c.sample = ml_collections.ConfigDict(
        dataclasses.asdict(
            sampling.SamplerConfig(
                num_steps=max(c.imagine_flash.student_steps), noise_correction=True
            )
        )
    )
    c.lock()
    return c


def hyper(h):
    """Learning rate × teacher solve steps k (launch/sweep.py expands it into jobs)."""
    return h.product(
        [
            h.sweep("config.optimizer.learning_rate", [5e-6, 1e-5, 2e-5]),
            h.sweep("config.imagine_flash.teacher_steps", [2, 4]),
        ]
    )
