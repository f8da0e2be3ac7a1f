"""Error raised for invalid user input (data files, configs, checkpoints)."""


class InputError(ValueError):
    """An input file, id or setting is invalid.

    The message names the file, id or key, what was expected and what to do. The
    command-line entry point prints it without a traceback.
    """
