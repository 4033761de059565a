"""The one error type of the serving tools: every CLI failure becomes a one-line message from it."""


class ServerError(RuntimeError):
    """TorchServe could not be started, reached or stopped; the message says what to do."""
