"""Exceptions raised for bad input, each carrying one self-explaining line.

TimberConfigError deliberately does not derive from ValueError: pydantic wraps a
ValueError raised inside a validator into a multi-line ValidationError, while any
other exception passes through with our message intact.
"""


class TimberError(Exception):
    """Bad input to a Timber merge; the message is one line naming the tensor or key."""


class TimberConfigError(TimberError):
    """A parameter in the YAML (or API call) is invalid."""


class TimberInputError(TimberError, ValueError):
    """The models or tensors given to the merge are unusable."""
