"""The ``hf-medbeit`` console command: ``hf-medbeit train ...`` (more subcommands as they land).

A ``UserError`` (bad input the user can fix) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import UserError

USAGE = """usage: hf-medbeit COMMAND [ARGS]

commands:
  train    fine-tune a model on a MedMNIST data set (hf-medbeit train --help)
"""


def run_with_user_errors(function: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    try:
        function(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"hf-medbeit: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


def _train(argv: list[str]) -> None:
    from .finetune import main

    main(argv)


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hf-medbeit: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    run_with_user_errors(COMMANDS[command], rest)


if __name__ == "__main__":
    main()
