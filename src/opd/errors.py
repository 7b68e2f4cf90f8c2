"""The one exception type users meet: a message that names the input at fault and the fix."""


class OPDError(Exception):
    """Bad input or an impossible request; the CLI prints the message without a traceback."""
