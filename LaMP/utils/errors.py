"""User-facing errors.

A ``LampError`` is a mistake the user can fix (a bad path, a malformed file, an unknown task,
ids that do not match). Scripts end such a run with its one-line message and exit status 2,
without a traceback; ``assert`` stays for internal invariants.
"""
import signal


class LampError(Exception):
    """A problem with the user's input, reported as one line that names the file/field/ids."""


def preview(ids, limit: int = 5) -> str:
    """``count (first few: a, b, c)`` for error messages about sets of ids."""
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:limit])
    more = ", …" if len(ids) > limit else ""
    return f"{len(ids)} (first: {shown}{more})"


class Terminated(BaseException):
    """SIGTERM or SIGHUP, turned into an exception so that ``finally`` blocks (which remove
    the temporaries of outputs being written) run before the process exits."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# The stop signals this process received, recorded by the handlers ``cli.program.run``
# installs. A handler's exception is lost when the signal lands inside a ``__del__`` or a
# weakref callback (Python prints it and goes on), so every place that publishes an output
# asks here first: a run the user stopped never writes a file after the stop.
_received: list[int] = []


def note_stop(signum: int) -> None:
    _received.append(signum)


def forget_stops() -> None:
    _received.clear()


def stopped() -> bool:
    return bool(_received)


def raise_if_stopped() -> None:
    """Raise the interruption a received stop signal asked for, if its exception was lost."""
    if _received:
        if _received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(_received[0])
