"""The one exception type a user sees.

Every problem the user can fix (a wrong flag, a missing file, a bad config key) is raised as
``UserError`` with a single-line message that names the problem and the fix. The command-line
entry points print that line and exit non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""

    exit_code = 2
    label = "error"  # printed as "hf-medbeit: <label>: <message>"
