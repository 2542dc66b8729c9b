"""The one exception type a user ever sees: a clear line, no traceback."""


class LlmpressError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits 1."""
