"""Errors that mean "the user asked for something wrong": main prints them without a traceback."""


class JaxkdError(Exception):
    """Base of every user-facing error; `main` turns it into a message and exit code 2."""


class ConfigError(JaxkdError, ValueError):
    pass


class CheckpointError(JaxkdError, ValueError):
    pass


class NonFiniteLossError(JaxkdError, RuntimeError):
    pass
