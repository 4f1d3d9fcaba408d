"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class HymirecError(Exception):
    """A user-facing failure: bad input, a missing tool, a service that is not there.

    Raise it with a message a user can act on; `hymirec` prints `hymirec: error: <message>` and
    exits 1 instead of showing a traceback.
    """
