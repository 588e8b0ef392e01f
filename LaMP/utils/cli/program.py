"""What every script's ``main`` runs inside: its parser, logging, and the way a run ends
(one ``error:`` line, ``interrupted``, ``terminated``)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Callable, Sequence

from LaMP.utils.errors import (LampError, Terminated, forget_stops, note_stop,
                               raise_if_stopped, stopped)
from LaMP.utils.seeds import MAX_SEED

class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage mistakes end like every other user mistake
    here: one line that starts ``error:`` and exit status 2 (argparse's own format is a usage
    block and then ``prog: error: …``). The usage stays one ``--help`` away."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def seed_arg(text: str) -> int:
    """argparse type of every --seed: an integer in 0 … 2**32 - 1, checked while parsing."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{seed} is outside 0 … {MAX_SEED}")
    return seed


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once, from a script's ``main``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # rouge_score logs through absl at INFO on every scorer it builds; keep that out.
    logging.getLogger("absl").setLevel(logging.WARNING)


_handler_owner: list[int] = []  # the pid that installed the handler (run() of this process)


def _raise_stop(signum, frame) -> None:
    if os.getpid() not in _handler_owner:
        # A forked worker (a multiprocessing pool) inherits the handler; it has no run() to
        # catch the exception and would print a traceback: it dies the default way instead.
        signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else signal.SIG_DFL)
        if signum != signal.SIGINT:
            os.kill(os.getpid(), signum)
        return
    note_stop(signum)  # kept even if the exception below is lost (raised inside a __del__)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def _quiet_lost_stops(unraisable) -> None:
    """sys.unraisablehook: a stop's exception lost inside a ``__del__`` is not printed as a
    traceback; the run ends interrupted at its next output instead (errors.raise_if_stopped)."""
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)) and stopped():
        return
    sys.__unraisablehook__(unraisable)


def _interruption(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated at the root of ``error``'s chain, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# Ctrl-C, and what `kill`, a batch scheduler, a container stop or a closed terminal sends,
# each with the handling it replaces (Python's own for Ctrl-C).
_STOP_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                 signal.SIGHUP: signal.SIG_DFL}


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; a user mistake ends with one line on stderr and status 2.

    SIGTERM and SIGHUP end the run like Ctrl-C does: writes in progress are abandoned and
    their temporaries removed; the status is 128 + the signal number (143 for SIGTERM, 130
    for Ctrl-C). A stop that lands where Python drops exceptions (a ``__del__``) still ends
    the run, at its next output or at its end, and nothing is written after it.
    """
    previous = {}
    forget_stops()
    # signal.signal works only in the main thread; elsewhere (a test runner's worker) the
    # default handling stays. A signal already ignored (nohup) or handled stays so.
    if threading.current_thread() is threading.main_thread():
        _handler_owner[:] = [os.getpid()]
        for signum, default in _STOP_SIGNALS.items():
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, _raise_stop)
    hook, sys.unraisablehook = sys.unraisablehook, _quiet_lost_stops
    try:
        try:
            main(argv)
            # A stop whose exception was lost after the last output was published.
            raise_if_stopped()
        except SystemError as error:
            # A signal whose handler raised while a C extension was calling back into Python
            # (ijson building an object) comes out wrapped: the interruption is what happened.
            raise _interruption(error) or error
    except LampError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:
            raise  # not about a path: a fault to see whole
        # A path the system refused (a name too long, a file where a folder must be, no
        # permission) that no check named first: one line, as a user mistake ends.
        print(f"error: {error.filename}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"terminated ({signal.Signals(stop.signum).name})", file=sys.stderr)
        return 128 + stop.signum
    finally:
        sys.unraisablehook = hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
