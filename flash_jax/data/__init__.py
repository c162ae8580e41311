"""Shapes testbed data: procedural generator (`shapes`) and Grain / TFDS pipelines (`sources`)."""
