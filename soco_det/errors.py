"""Exceptions that mean "the user's input is wrong", as opposed to a bug.

The CLI prints these as one ``error: ...`` line (no traceback) and exits with status 2. Messages
should name the file or key at fault and say what is wrong with it.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an unreadable image, a wrong option."""


class ImageError(UserError):
    """An image file that cannot be used; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
