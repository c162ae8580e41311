"""Evaluation: the testbed's judge network, Fréchet distances, alignment and colour statistics."""
