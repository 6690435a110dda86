"""The one exception type users see: a problem with their input or options.

The CLI prints its message on one line and exits with code 2; anything else
that escapes is a bug in vpdetect.
"""


class VPDetectError(Exception):
    """A user-facing error: bad input, bad options, wrong model, missing file."""
