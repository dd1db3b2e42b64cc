"""Exceptions the command line turns into one line instead of a traceback.

:class:`UserError` means "the user's input is wrong", as opposed to a bug: the CLI prints it as one
``error: ...`` line and exits with status 2. Messages should name the file or key at fault and say
what is wrong with it. :class:`Interrupted` is a run that stopped on a signal after saving its state
(exit status 128 + the signal).
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an unreadable image, a wrong option."""


class ImageError(UserError):
    """An image file that cannot be used; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class Interrupted(Exception):
    """The run stopped on a signal after saving its state; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
