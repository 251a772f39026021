"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in the user's input: the CLI prints the message on one line and exits 2.

    The message must say what is wrong and how to fix it.
    """

    exit_code = 2
