"""Shapes testbed configs."""
