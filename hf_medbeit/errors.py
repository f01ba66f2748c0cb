"""The one exception type a user sees.

Every problem the user can fix (a wrong flag, a missing file, a bad config key) is raised as
``UserError`` with a single-line message that names the problem and the fix. The command-line
entry points print that line and exit non-zero; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""

    exit_code = 2
    label = "error"  # printed as "hf-medbeit: <label>: <message>"


def run_with_user_errors(function: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run an entry point; a ``UserError`` becomes one ``hf-medbeit: <label>: ...`` line on stderr
    and its exit status (2 for bad input). Everything else is a bug and keeps its traceback."""
    try:
        function(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"hf-medbeit: {error.label}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
