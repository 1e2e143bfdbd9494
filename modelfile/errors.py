"""The one exception type users see: its message is a complete, single-line explanation."""


class HeteroError(Exception):
    """A problem with the user's input (file, options, plan) rather than a bug in hetero."""
