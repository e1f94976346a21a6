"""The one exception type users see: a message that names the input and the fix."""


class AniPortraitError(Exception):
    """Bad input or a missing resource.

    The entry points print ``str(error)`` as one line and exit with status 2, so the message must say
    what was wrong, with which file or config key, and how to fix it.
    """
