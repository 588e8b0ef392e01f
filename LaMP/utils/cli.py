"""The small amount of plumbing every script shares: logging set-up and error handling."""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable, Iterable, Sequence

from LaMP.utils.errors import LampError

# The default --seed of every stage that draws random numbers, so that on-the-fly ranking in
# evaluate/train_llm.py orders profiles as rank_profiles.py does with default flags.
DEFAULT_SEED = 42


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


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that ``finally`` blocks (which remove the
    temporaries of outputs being written) run before the process exits."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; a user mistake ends with one line on stderr and status 2.

    SIGTERM (what ``kill``, a batch scheduler or a container stop sends) ends the run like
    Ctrl-C does: writes in progress are abandoned and their temporaries removed; status 143.
    """
    # signal.signal works only in the main thread; elsewhere (a test runner's worker) the
    # default SIGTERM handling stays.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        main(argv)
    except LampError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def format_table(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    """A plain-text table for the terminal: left-aligned columns under a dashed rule."""
    rows = [tuple(str(cell) for cell in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
