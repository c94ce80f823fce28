"""The command line, ``colab-dreambooth COMMAND``: the parser and exit codes (``parser``), the
options derived from the configuration's fields (``options``), and one module per group of
commands. Nothing else in the package imports it."""

from colab_dreambooth.cli.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_STOPPED, EXIT_USAGE
from colab_dreambooth.cli.parser import build_parser, main

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_STOPPED"]
