"""The ``hf-medbeit`` console command: ``hf-medbeit train ...`` (more subcommands as they land).

A ``UserError`` (bad input the user can fix) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from .errors import run_with_user_errors

USAGE = """usage: hf-medbeit COMMAND [ARGS]

commands:
  train    fine-tune a model on a MedMNIST data set (hf-medbeit train --help)
  predict  classify image files with a run folder or a Hub model (hf-medbeit predict --help)
  push     push a finished run folder to the Hugging Face Hub (hf-medbeit push --help)
  benchmark  one results table from finished run folders (hf-medbeit benchmark --help)
  pretrain  pre-train a BEiT by masked image modeling on unlabelled images (hf-medbeit pretrain --help)
  explain  heat maps of where a model looks, per image (hf-medbeit explain --help)
  demo     a web page to try a model on your own images (hf-medbeit demo --help)
  study    run a grid of runs (models x data sets x seeds ...), one process per cell, and write one
           results table beside the quoted references (hf-medbeit study --help)
"""


def _train(argv: list[str]) -> None:
    from .finetune import main

    main(argv)


def _pretrain(argv: list[str]) -> None:
    from .pretrain import main

    main(argv)


def _explain(argv: list[str]) -> None:
    from .explain import main

    main(argv)


def _demo(argv: list[str]) -> None:
    from .demo import main

    main(argv)


def _predict(argv: list[str]) -> None:
    from .predict import main

    main(argv)


def _push(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="hf-medbeit push",
        description="Push a finished run folder (model, processor, results, plots, model card) to the Hub in one "
        "commit; checkpoints, optimizer states and training_args.bin stay local. The token comes from HF_TOKEN "
        "or `hf auth login`.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A finished run folder (with all_results.json).")
    parser.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="USER/NAME or ORG/NAME.")
    parser.add_argument("--private", action="store_true", default=None, help="Create the repository as private.")
    parser.add_argument("--revision", default=None, help="Branch to push to (created from main if missing).")
    parser.add_argument("--commit-message", "--commit_message", dest="commit_message", default=None)
    args = parser.parse_args(argv)

    from .hub import push_run

    url = push_run(args.run_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message)
    print(f"hf-medbeit: pushed {args.run_dir} to {args.repo_id}: {url}")


def _benchmark(argv: list[str]) -> None:
    from .report import main

    main(argv)


def _study(argv: list[str]) -> None:
    from .study import main

    main(argv)


COMMANDS = {"train": _train, "pretrain": _pretrain, "predict": _predict, "explain": _explain, "demo": _demo, "push": _push, "benchmark": _benchmark, "study": _study}


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
