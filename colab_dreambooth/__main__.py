"""``python -m colab_dreambooth``: the command line."""

import sys

from colab_dreambooth.cli.parser import main

sys.exit(main())
