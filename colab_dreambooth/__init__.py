"""colab-dreambooth: DreamBooth fine-tuning of Stable Diffusion from notebooks.

The data path, top to bottom: :mod:`.config` (every field) -> :mod:`.params` (JSON) ->
:mod:`.validation` -> :mod:`.data` (images, captions, prompts) -> :mod:`.models` ->
:mod:`.train` (the loop) -> a saved diffusers folder -> :mod:`.sample`.
"""

from .config import Concept, DreamBoothConfig
from .errors import UserError
from .params import load_params, save_params
from .validation import ConfigError, validate

__version__ = "0.1.0"
__all__ = ["Concept", "DreamBoothConfig", "ConfigError", "UserError", "load_params",
           "save_params", "validate", "__version__"]
