"""The generic trainer: state, one compiled step, checkpoints, the run loop."""
