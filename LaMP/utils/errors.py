"""User-facing errors.

A ``LampError`` is a mistake the user can fix (a bad path, a malformed file, an unknown task,
ids that do not match). Scripts end such a run with its one-line message and exit status 2,
without a traceback; ``assert`` stays for internal invariants.
"""


class LampError(Exception):
    """A problem with the user's input, reported as one line that names the file/field/ids."""


def preview(ids, limit: int = 5) -> str:
    """``count (first few: a, b, c)`` for error messages about sets of ids."""
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:limit])
    more = ", …" if len(ids) > limit else ""
    return f"{len(ids)} (first: {shown}{more})"
