"""The one exception type users see: the CLI prints it as a one-line error."""


class MlakitError(Exception):
    """A problem with the user's input or environment, explained in the message."""
