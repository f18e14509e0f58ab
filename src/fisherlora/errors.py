"""The one exception type for input a user can fix (bad names, files, numbers)."""


class ConfigError(ValueError):
    """A setting, file or data set that cannot be used as given.

    The message names the offending value and, where there is a fixed set, the valid choices.
    The command-line tool prints it without a traceback.
    """
