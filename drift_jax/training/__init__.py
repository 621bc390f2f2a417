"""Training: losses and objectives, the train step and loop, checkpoints, the online-RL loss."""
