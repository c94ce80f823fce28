"""Single-file checkpoints (the original LDM layout): key maps, shipped model configs, import into
a diffusers folder (Create Model), export back, and dehydrate/rehydrate."""
