"""The model: loading the base model's parts, the tiny offline model, pipelines, prompt encoding,
LoRA adapters, and the single-file formats users exchange (``single_file``)."""
