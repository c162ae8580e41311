"""flash-jax: Imagine Flash distillation of text-to-image diffusion models in JAX/Flax."""
