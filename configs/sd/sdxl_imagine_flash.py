"""Imagine Flash distillation of SDXL base 1.0 (1024 px, ε-prediction, two text encoders).

Same recipe as configs/sd/sd15_imagine_flash.py with $SDXL = a diffusers folder of
stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/). Conditioning as diffusers computes it: both encoders' penultimate
hidden states concatenated (768 + 1280 = 2048), the pooled projection of text_encoder_2 (1280)
and the size micro-conditioning time_ids = (1024, 1024, 0, 0, 1024, 1024) — the images are
centre-cropped squares, so original size, crop and target are not varied. The empty prompt's
conditioning is zeros (force_zeros_for_empty_prompt). The VAE is SDXL's (scaling 0.13025) and runs
in float32 in the cache job. The refiner is not part of this config.
Variants: "1", "2", "3", "all", "tpu_v5e_8", "tpu_v4_8", "gpu_8xh100", "folder=PATH" (as
in configs/sd/sd15_imagine_flash.py).
"""

import ml_collections

from configs.sd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.imagine_flash(
        arg,
        "configs/sd/sdxl_imagine_flash.py",
        unet=common.SDXL_UNET,
        text=common.CLIP_L_TEXT,
        text_2=common.OPENCLIP_BIGG_TEXT,
        autoencoder=common.sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        presets={
            "gpu_8xh100": common.preset(dict(fsdp=8), batch_size=8),
            "tpu_v4_8": common.preset(dict(fsdp=4, tensor=2), batch_size=4),
            "tpu_v5e_8": common.preset(dict(fsdp=4, tensor=2), batch_size=4),
        },
        guidance_scale=5.0,
    )


def get_hyper(h):
    return common.hyper(h)
