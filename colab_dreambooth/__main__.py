"""``python -m colab_dreambooth``: the command line."""

import sys

from colab_dreambooth.cli import main

sys.exit(main())
