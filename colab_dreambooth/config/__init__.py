"""What a run is: the field declarations, the configuration dataclasses, the extension's prompt
rules, validation, GPU presets and the parameters JSON. Never imports data, models or training."""
