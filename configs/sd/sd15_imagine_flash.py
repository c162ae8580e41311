"""Imagine Flash distillation of Stable Diffusion 1.5 (512 px, ε-prediction, CLIP ViT-L/14 text).

Two paths are all it needs (docs/scaling.md has the whole recipe):
  # once: the latent cache of an image–caption dataset prepared with flash_jax.data.captions
  python -m flash_jax.data.cache --config configs/sd/sd15_imagine_flash.py \
      --config.model.pretrained=$SD15 --config.data.source=captions \
      --config.data.data_dir=$IMAGES_TFDS --out $CACHE
  # distil
  python -m flash_jax.main --config configs/sd/sd15_imagine_flash.py:gpu_8xh100 --workdir $RUN \
      --config.model.pretrained=$SD15 --config.data.data_dir=$CACHE
$SD15 is a diffusers folder of runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/,
tokenizer/). Variants (comma-separated): "1", "2", "3" student steps (default 3), "all" (one
student for 1/2/3), "tpu_v5e_8" / "gpu_8xh100" (mesh presets, see configs/sd/common.py).
"""

import ml_collections

from configs.sd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.imagine_flash(
        arg,
        unet=common.SD15_UNET,
        text=common.CLIP_L_TEXT,
        autoencoder=common.sd_vae(sample_size=512),
        image_size=512,
        guidance_scale=7.5,
    )


def get_hyper(h):
    return common.hyper(h)
