"""Exit codes of ``colab-dreambooth`` (the README lists them): scripts can chain
``train && export`` safely."""

EXIT_OK = 0
EXIT_ERROR = 1  # a problem with the input or the situation; one "error: ..." line says what
EXIT_USAGE = 2  # unknown option or bad value (argparse)
EXIT_STOPPED = 130  # stopped before the last step (Ctrl-C, Stop): checkpoint and model written
