"""Single-file models, the formats users exchange, one job a module:

- ``readers``: opening ``.safetensors``/``.ckpt`` files and diffusers part folders without
  running their code; ``ModelFileError``, the error of every single-file model operation;
- ``ldm_keys``: the original (LDM) weight names and their diffusers twins;
- ``model_configs``: the shipped diffusers configs, those the weights' shapes imply, and the
  prediction type;
- ``convert``: Create Model, a single file into a diffusers folder; ``export``: back again;
- ``dehydrate`` / ``rehydrate``: a trained model as its difference from the base, with
  ``dehydrate_codec`` (per tensor), ``dehydrated_file`` (the file) and ``base_weights``.

The ``.safetensors`` streaming itself is :mod:`colab_dreambooth.safetensors_stream`.
"""
