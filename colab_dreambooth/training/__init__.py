"""The training run: plan (memory, fit, disk space), optimizer and schedule, noise, numerics,
checkpoints of the training state, and ``train`` itself."""
