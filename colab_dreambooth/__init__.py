"""colab-dreambooth: DreamBooth fine-tuning of Stable Diffusion from notebooks.

The data path, top to bottom: :mod:`.config` (every field) -> :mod:`.params` (JSON) ->
:mod:`.validation` -> :mod:`.data` (images, captions, prompts) -> :mod:`.models` ->
:mod:`.train` (the loop) -> a saved diffusers folder -> :mod:`.sample`.
"""

from colab_dreambooth.config.concept import Concept
from colab_dreambooth.config.params import load_params, save_params
from colab_dreambooth.config.settings import DreamBoothConfig
from colab_dreambooth.config.validation import validate
from colab_dreambooth.errors import ConfigError, UserError

__version__ = "0.1.0"
__all__ = ["Concept", "DreamBoothConfig", "ConfigError", "UserError", "load_params",
           "save_params", "validate", "__version__"]
