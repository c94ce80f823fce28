"""``python -m colab_dreambooth``: the command line."""

import sys

from .cli import main

sys.exit(main())
