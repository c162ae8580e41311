"""Flax (linen) modules: UNet, CLIP text encoder, AutoencoderKL, discriminators; NHWC inside."""
