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
student for 1/2/3); "tpu_v5e_8" / "tpu_v4_8" / "gpu_8xh100": the mesh, global batch and dtypes that
fit that 8-chip machine (configs/sd/common.py, measured in docs/scaling.md); "folder=PATH": the
architecture from PATH's own config.json files (and model.pretrained=PATH) instead of the published
SD1.5 one, for a fine-tune or a model of another shape.
"""

import ml_collections

from configs.sd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return common.imagine_flash(
        arg,
        "configs/sd/sd15_imagine_flash.py",
        unet=common.SD15_UNET,
        text=common.CLIP_L_TEXT,
        autoencoder=common.sd_vae(sample_size=512),
        presets={
            "gpu_8xh100": common.preset(dict(fsdp=8), batch_size=24),
            "tpu_v4_8": common.preset(dict(fsdp=8), batch_size=8),
            "tpu_v5e_8": common.preset(dict(fsdp=4, tensor=2), batch_size=4),
        },
        guidance_scale=7.5,
    )


def get_hyper(h):
    return common.hyper(h)
