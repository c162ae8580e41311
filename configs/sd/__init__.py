"""Stable Diffusion (SD1.5, SD2.1, SDXL) distillation configs; they need weights and a latent cache."""
