"""Experiment configs (ml_collections); run with python -m flash_jax.main --config <file>[:variant]."""
