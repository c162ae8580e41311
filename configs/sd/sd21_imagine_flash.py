"""Imagine Flash distillation of Stable Diffusion 2.1 (768 px, v-prediction, OpenCLIP ViT-H text,
linear attention projections, attention upcast to float32).

Same recipe as configs/sd/sd15_imagine_flash.py with $SD21 = a diffusers folder of
stabilityai/stable-diffusion-2-1 (its tokenizer pads with "!", read from tokenizer/).
Variants: "1", "2", "3", "all", "tpu_v5e_8", "tpu_v4_8", "gpu_8xh100", "folder=PATH" (as
in configs/sd/sd15_imagine_flash.py).
"""

import ml_collections

from configs.sd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.imagine_flash(
        arg,
        "configs/sd/sd21_imagine_flash.py",
        unet=common.SD21_UNET,
        text=common.OPENCLIP_H_TEXT,
        autoencoder=common.sd_vae(sample_size=768),
        presets={
            "gpu_8xh100": common.preset(dict(fsdp=8), batch_size=16),
            "tpu_v4_8": common.preset(dict(fsdp=8), batch_size=8),
            "tpu_v5e_8": common.preset(dict(fsdp=4, tensor=2), batch_size=4),
        },
        guidance_scale=7.5,
        prediction_type="v_prediction",
    )


def get_hyper(h):
    return common.hyper(h)
