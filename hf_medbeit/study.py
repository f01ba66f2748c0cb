"""`hf-medbeit study GRID.yaml`: a base config times axes, run cell by cell, then one results table.

A grid file::

    output_dir: runs/study/breastmnist-cpu      # the study's root folder
    base: {dataset_name: breastmnist, ...}      # train arguments every cell shares
    axes:                                       # the cartesian product of these is the cells
      model:                                    # a named axis: name -> train arguments
        tiny-beit: {model_type: beit, config_overrides: "..."}
        resnet18-28: {include: configs/models/resnet18_28.yaml}
      balancing: [none, weighted_loss]          # a list axis: one argument, its values
      seed: [0, 1, 2]                           # pooled in the table (mean +- std over seeds)
    overrides:                                  # optional: arguments for some cells only
      - when: {model: tiny-beit}
        set: {learning_rate: 5e-4}
    baseline: {model: resnet18-28}              # optional: paired tests against it in the table

Each cell is an ordinary run folder ``<output_dir>/<cell>``, trained by ``hf-medbeit train
<output_dir>/<cell>.yaml`` in a process of its own, so nothing (accelerate state, CUDA context,
RNG) leaks from one cell into the next. That config file is written beside the folder, so any cell
can be rerun alone. The cell name joins one part per axis: a named axis gives its value's name, a
list axis ``<argument>-<value>``; names are checked to be unique before anything runs.

Everything is checked before the first cell starts: the grid's shape, every cell's arguments
(parsed exactly as ``hf-medbeit train`` parses them), and that no cell already started was started
with another config. Running the command again skips finished cells and resumes unfinished ones
(``hf-medbeit train`` resumes its own run folder); a failed cell is reported and the study goes on.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

GRID_KEYS = ("output_dir", "description", "base", "axes", "overrides", "baseline", "notes")
SEED_AXIS = "seed"  # the one axis the results table pools over (mean +- std)
INCLUDE = "include"
# The study owns these: each cell's folder and name come from the grid.
MANAGED_ARGUMENTS = ("output_dir", "run_name")
LOG_SUFFIX = ".log"
CONFIG_SUFFIX = ".yaml"


class StudyFailed(UserError):
    """Some cells failed; the others ran. Not bad input to the study, so exit status 1."""

    exit_code = 1


class StudyInterrupted(UserError):
    label = "stopped"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class AxisValue:
    label: str  # as shown in names and tables: the value's name (named axis) or the value itself
    raw: object  # the YAML value (list axis) or the name (named axis)
    arguments: dict  # the train arguments it sets
    name_part: str  # its part of the cell name


@dataclass
class Axis:
    name: str
    values: list[AxisValue]
    named: bool


@dataclass
class Cell:
    index: int  # position in the full expansion: what --shard splits on
    name: str
    values: dict  # axis name -> AxisValue
    arguments: dict  # the resolved train arguments, output_dir and run_name included
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def config_path(self) -> Path:
        return self.root / f"{self.name}{CONFIG_SUFFIX}"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}{LOG_SUFFIX}"

    @property
    def method(self) -> str:
        """The cell's name without its seed: the row of the results table it belongs to."""
        parts = [value.name_part for axis, value in self.values.items() if axis != SEED_AXIS]
        return "_".join(parts) or "all"

    @property
    def seed_label(self) -> str | None:
        value = self.values.get(SEED_AXIS)
        return value.label if value is not None else None


@dataclass
class Grid:
    path: Path
    root: Path
    axes: list[Axis]
    cells: list[Cell]
    description: str | None = None
    baseline: dict = field(default_factory=dict)  # axis name -> AxisValue
    notes: list[str] = field(default_factory=list)

    def axis(self, name: str) -> Axis:
        return next(axis for axis in self.axes if axis.name == name)


# --- reading and expanding a grid -----------------------------------------------------------

def load_grid(path: str | os.PathLike) -> Grid:
    """Read, check and expand a grid file; every problem is one ``UserError`` line naming the file."""
    path = Path(path)
    where = str(path)
    data = _read_mapping(path, what="grid file")
    unknown = [key for key in data if key not in GRID_KEYS]
    if unknown:
        if "axes" not in data:
            raise UserError(f"{where} has no 'axes' (it has {unknown[0]!r}): it looks like a train config; run it with "
                            "hf-medbeit train, or write a grid with base:, axes: and output_dir: "
                            "(see configs/study/grid.yaml)")
        raise UserError(f"{where}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), GRID_KEYS)}; "
                        f"a grid file has {', '.join(GRID_KEYS)}")
    root = data.get("output_dir")
    if not isinstance(root, str) or not root.strip():
        raise UserError(f"{where}: output_dir must name the study's root folder (e.g. output_dir: runs/study/mine); "
                        "every cell's run folder goes inside it")
    base = _arguments(data.get("base") or {}, f"{where}: base")
    axes = _read_axes(data.get("axes"), where)
    overrides = _read_overrides(data.get("overrides"), axes, where)
    baseline = _read_baseline(data.get("baseline"), axes, where)
    notes = data.get("notes") or []
    if isinstance(notes, str):
        notes = [notes]
    if not isinstance(notes, list) or not all(isinstance(note, str) for note in notes):
        raise UserError(f"{where}: notes must be a list of sentences; write each note as '- text'")
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        raise UserError(f"{where}: description must be text; quote it")
    _refuse_shared_arguments(axes, where)
    cells = _expand(axes, base, overrides, Path(root), where)
    return Grid(path, Path(root), axes, cells, description, baseline, notes)


def _read_mapping(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserError(f"cannot read {what} {path} ({error.strerror or error})") from error
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise UserError(f"{path} is not valid YAML ({detail}); fix its syntax") from error
    if data is None:
        raise UserError(f"{what} {path} is empty; see configs/study/grid.yaml for the format")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else "a single value"
        raise UserError(f"{what} {path} holds {kind}, not a mapping; see configs/study/grid.yaml for the format")
    return data


def _arguments(mapping, where: str, allow_include: bool = True) -> dict:
    """A mapping of train arguments, with ``include: FILE`` (or a list of files) merged in first:
    the mapping's own keys override the included ones."""
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must be a mapping of train arguments (argument: value); got {mapping!r}")
    merged = {}
    includes = mapping.get(INCLUDE)
    if includes is not None:
        if not allow_include:
            raise UserError(f"{where}: an included file cannot include another; merge them into one file")
        for include in includes if isinstance(includes, list) else [includes]:
            if not isinstance(include, str):
                raise UserError(f"{where}: include must be a file path or a list of them, not {include!r}")
            # Relative to the folder the command runs in, like every other path in a config (data_dir, output_dir).
            included = _read_mapping(Path(include), what=f"{where}: included file")
            merged.update(_arguments(included, f"{where}: {include}", allow_include=False))
    for key, value in mapping.items():
        if key == INCLUDE:
            continue
        if not isinstance(key, str):
            raise UserError(f"{where}: {key!r} is not an argument name; write argument: value")
        if key in MANAGED_ARGUMENTS:
            raise UserError(f"{where} sets {key}; the study names each cell's run folder itself: set the study's "
                            "root with the grid's top-level output_dir and remove it here")
        merged[key] = value
    return merged


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def sanitise(text: str) -> str:
    """A safe piece of a folder name: letters, digits, '.', '+' and '-'; anything else becomes '-'."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _read_axes(axes, where: str) -> list[Axis]:
    if not isinstance(axes, dict) or not axes:
        raise UserError(f"{where}: axes must be a non-empty mapping, e.g. axes: {{seed: [0, 1, 2]}}; a study needs "
                        "at least one axis (for a single run use hf-medbeit train)")
    result = []
    for name, values in axes.items():
        if not isinstance(name, str) or not sanitise(name):
            raise UserError(f"{where}: axis {name!r} needs a name made of letters or digits")
        if isinstance(values, list):
            if not values:
                raise UserError(f"{where}: axis {name} has no values; give it a list of values or remove it")
            if not all(_scalar(value) for value in values):
                raise UserError(f"{where}: axis {name}: a list axis takes plain values; for values that set several "
                                f"arguments, make it a named axis ({name}: {{label: {{argument: value}}}})")
            labels = [str(value) for value in values]
            if len(set(labels)) != len(labels):
                duplicate = next(label for label in labels if labels.count(label) > 1)
                raise UserError(f"{where}: axis {name} lists {duplicate} twice; remove the duplicate")
            if name == INCLUDE or name in MANAGED_ARGUMENTS:
                raise UserError(f"{where}: {name} cannot be an axis; the study sets it for each cell")
            result.append(Axis(name, [AxisValue(str(value), value, {name: value}, sanitise(f"{name}-{value}"))
                                      for value in values], named=False))
        elif isinstance(values, dict):
            if not values:
                raise UserError(f"{where}: axis {name} has no values; give it name: {{argument: value}} entries")
            axis_values = []
            for label, arguments in values.items():
                if not _scalar(label) or not sanitise(str(label)):
                    raise UserError(f"{where}: axis {name}: value name {label!r} needs letters or digits")
                axis_values.append(AxisValue(str(label), label, _arguments(arguments or {}, f"{where}: {name}: {label}"),
                                             sanitise(str(label))))
            result.append(Axis(name, axis_values, named=True))
        else:
            raise UserError(f"{where}: axis {name} must be a list of values or a mapping name -> arguments, "
                            f"not {values!r}")
    return result


def _find_value(axis: Axis, wanted) -> AxisValue | None:
    for value in axis.values:
        if value.raw == wanted or value.label == str(wanted):
            return value
    return None


def _selection(mapping, axes: list[Axis], where: str) -> dict:
    """``{axis: value}`` -> ``{axis: AxisValue}``, each axis and value checked against the grid."""
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{where} must be a mapping axis: value, e.g. {{model: resnet18-28}}")
    by_name = {axis.name: axis for axis in axes}
    chosen = {}
    for name, wanted in mapping.items():
        if name not in by_name:
            raise UserError(f"{where}: no axis {name!r}{_suggest(str(name), by_name)}; the axes are "
                            f"{', '.join(by_name)}")
        value = _find_value(by_name[name], wanted)
        if value is None:
            raise UserError(f"{where}: axis {name} has no value {wanted!r}; it has "
                            f"{', '.join(value.label for value in by_name[name].values)}")
        chosen[name] = value
    return chosen


def _read_overrides(overrides, axes: list[Axis], where: str) -> list[tuple[dict, dict]]:
    if overrides is None:
        return []
    if not isinstance(overrides, list):
        raise UserError(f"{where}: overrides must be a list of {{when: {{axis: value}}, set: {{argument: value}}}}")
    result = []
    for number, rule in enumerate(overrides, 1):
        if not isinstance(rule, dict) or set(rule) != {"when", "set"}:
            raise UserError(f"{where}: override {number} must have exactly when: and set: "
                            "(e.g. - when: {model: tiny-beit}\\n  set: {learning_rate: 5e-4})")
        result.append((_selection(rule["when"], axes, f"{where}: override {number}: when"),
                       _arguments(rule["set"], f"{where}: override {number}: set")))
    return result


def _read_baseline(baseline, axes: list[Axis], where: str) -> dict:
    if baseline is None:
        return {}
    chosen = _selection(baseline, axes, f"{where}: baseline")
    if SEED_AXIS in chosen:
        raise UserError(f"{where}: baseline names a seed; the table pools seeds, so name the method's other axes only")
    return chosen


def _refuse_shared_arguments(axes: list[Axis], where: str) -> None:
    """Two axes that set the same argument would make the product meaningless (the later one would
    silently win); per-combination values belong in overrides."""
    owner = {}
    for axis in axes:
        for key in {key for value in axis.values for key in value.arguments}:
            if key in owner:
                raise UserError(f"{where}: axes {owner[key]} and {axis.name} both set {key}; set it in one axis, "
                                "or use overrides: for combinations")
            owner[key] = axis.name


def _product(axes: list[Axis]):
    combinations = [[]]
    for axis in axes:
        combinations = [combination + [value] for combination in combinations for value in axis.values]
    return combinations


def _expand(axes, base, overrides, root: Path, where: str) -> list[Cell]:
    cells, seen = [], {}
    for index, combination in enumerate(_product(axes)):
        values = {axis.name: value for axis, value in zip(axes, combination)}
        name = "_".join(value.name_part for value in combination)
        # Case-insensitive file systems (macOS, Windows) would put two names differing in case in one folder.
        key = name.lower()
        if key in seen:
            other = seen[key]
            raise UserError(f"{where}: cells {other.index} and {index} would share the run folder {name} "
                            f"({_describe(other.values)} vs {_describe(values)}); give the axis values distinct "
                            "names (only letters, digits, '.', '+' and '-' are kept)")
        arguments = dict(base)
        for value in combination:
            arguments.update(value.arguments)
        for when, settings in overrides:
            if all(values[axis] is value for axis, value in when.items()):
                arguments.update(settings)
        arguments["output_dir"] = str(root / name)
        arguments["run_name"] = name
        cell = Cell(index, name, values, arguments, root)
        seen[key] = cell
        cells.append(cell)
    return cells


def _describe(values: dict) -> str:
    return ", ".join(f"{axis}={value.label}" for axis, value in values.items())


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- checking every cell before anything runs -----------------------------------------------

def cell_config_text(grid: Grid, cell: Cell) -> str:
    header = (f"# Cell {cell.index} of the study {grid.path} ({_describe(cell.values)}).\n"
              f"# Written by `hf-medbeit study`: edit the grid, not this file. To rerun this cell alone, from the\n"
              f"# folder the study ran in: hf-medbeit train {cell.config_path}\n")
    return header + yaml.safe_dump(cell.arguments, sort_keys=False, default_flow_style=False)


def validate_cells(grid: Grid) -> None:
    """Parse every cell's config exactly as ``hf-medbeit train`` will, in this process, before any
    cell runs: a typo in one cell must not surface hours into the study."""
    from .arguments import parse_args

    with tempfile.TemporaryDirectory(prefix="hf-medbeit-study-") as folder:
        for cell in grid.cells:
            path = Path(folder) / f"{cell.name}{CONFIG_SUFFIX}"
            path.write_text(cell_config_text(grid, cell))
            try:
                parse_args([str(path)])
            except UserError as error:
                message = str(error).replace(f"{path}: ", "").replace(str(path), "the cell's config")
                raise UserError(f"{grid.path}: cell {cell.name}: {message}") from error


def check_not_stale(grid: Grid) -> None:
    """A cell already started with other arguments (the grid was edited since) would be skipped as
    finished, or resumed, under a config it no longer has: refuse, naming the first difference."""
    for cell in grid.cells:
        if not cell.config_path.is_file() or cell_state(cell) == "new":
            continue
        try:
            recorded = yaml.safe_load(cell.config_path.read_text())
        except (OSError, yaml.YAMLError):
            recorded = None
        if recorded == cell.arguments:
            continue
        recorded = recorded if isinstance(recorded, dict) else {}
        changed = next(key for key in [*cell.arguments, *recorded] if recorded.get(key) != cell.arguments.get(key))
        raise UserError(f"{grid.path}: cell {cell.name} was started with {changed}: {recorded.get(changed)!r}, the grid "
                        f"now gives {cell.arguments.get(changed)!r}; restore the grid, or delete {cell.folder} and "
                        f"{cell.config_path} to run that cell again")


def cell_state(cell: Cell) -> str:
    """finished (valid all_results.json), damaged (all_results.json unreadable), unfinished (a
    non-empty folder: a killed or interrupted run, resumed when the study runs), or new."""
    from .outputs import RESULTS_FILE, UnreadableResults, read_results

    folder = cell.folder
    if (folder / RESULTS_FILE).is_file():
        try:
            read_results(folder)
            return "finished"
        except UnreadableResults:
            return "damaged"
    if folder.is_dir() and any(folder.iterdir()):
        return "unfinished"
    return "new"


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise UserError(f"--shard {text} must be I/N with 0 <= I < N (e.g. --shard 0/4 ... --shard 3/4); "
                        "each shard runs the cells whose index modulo N is I")
    return int(match[1]), int(match[2])


def shard_cells(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """Round robin over the expansion order, so every shard gets a mix of the axes' values."""
    return [cell for cell in cells if cell.index % count == index]


# --- running cells ---------------------------------------------------------------------------

def cell_command(cell: Cell, launcher: str, accelerate_config: str | None) -> list[str]:
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                "-m", "hf_medbeit.finetune", str(cell.config_path)]
    return [sys.executable, "-m", "hf_medbeit.cli", "train", str(cell.config_path)]


def _die_with_parent() -> None:
    """In the child: its own process group (a signal reaches it once, forwarded by the study), and
    SIGTERM if the study dies, so a killed study leaves no training running on its own (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def run_cell(cell: Cell, command: list[str]) -> tuple[int, int | None]:
    """Run one cell in its own process, its output appended to ``<cell>.log``. Ctrl-C or SIGTERM
    to the study is passed on once to the cell's process group, which saves a checkpoint and stops
    (a second Ctrl-C kills it, as with hf-medbeit train). Returns (exit status, signal received)."""
    received = []
    with open(cell.log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} hf-medbeit study: {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)

        def forward(signum, frame):
            received.append(signum)
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass

        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            status = process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return status, (received[0] if received else None)


def last_message(log_path: Path) -> str:
    """What the cell said last: its hf-medbeit error line if it printed one, else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("hf-medbeit: ")]
    line = errors[-1] if errors else (lines[-1] if lines else "no output")
    return line if len(line) <= 240 else line[:237] + "..."


def run_study(grid: Grid, cells: list[Cell], launcher: str, accelerate_config: str | None) -> list[str]:
    """Run the given cells one after another; returns one description per failed cell."""
    from .outputs import atomic_path, read_results

    grid.root.mkdir(parents=True, exist_ok=True)
    failures = []
    for position, cell in enumerate(cells, 1):
        state = cell_state(cell)
        prefix = f"[{position}/{len(cells)}] {cell.name}"
        if state == "finished":
            print(f"{prefix}: finished, skipped", flush=True)
            continue
        text = cell_config_text(grid, cell)
        if not cell.config_path.is_file() or cell.config_path.read_text() != text:
            with atomic_path(cell.config_path) as temporary:
                temporary.write_text(text)
        verb = "resuming" if state == "unfinished" else "starting"
        print(f"{prefix}: {verb} (log: {cell.log_path})", flush=True)
        started = time.time()
        status, signum = run_cell(cell, cell_command(cell, launcher, accelerate_config))
        elapsed = time.time() - started
        if signum is not None or status in (130, 143, -signal.SIGINT, -signal.SIGTERM):
            signum = signum or (signal.SIGINT if status in (130, -signal.SIGINT) else signal.SIGTERM)
            raise StudyInterrupted(f"interrupted in cell {cell.name} ({last_message(cell.log_path)}); run the same "
                                   "command again to resume: finished cells are skipped", 128 + signum)
        if status == 0 and cell_state(cell) == "finished":
            results = read_results(cell.folder)
            print(f"{prefix}: finished in {elapsed:.0f} s: test AUC {results['test_auc']:.4f}, "
                  f"ACC {results['test_acc']:.4f}", flush=True)
        else:
            reason = last_message(cell.log_path)
            print(f"{prefix}: FAILED (exit status {status}) after {elapsed:.0f} s: {reason}", flush=True)
            failures.append(f"{cell.name} (exit status {status}: {reason})")
    return failures


# --- the command -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-medbeit study",
        description="Run a grid of training runs (a base config times axes: model, data set, size, balancing, "
                    "seed, any argument), one process per cell, then write one results table (mean +- std over "
                    "seeds, bootstrap CIs, the quoted reference rows, paired tests against the grid's baseline) "
                    "and a figure into the study's folder. Running it again skips finished cells and resumes "
                    "unfinished ones.",
    )
    parser.add_argument("grid", metavar="GRID.yaml", help="The grid file (see configs/study/grid.yaml).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="Show the cells and their state (finished, unfinished, "
                      "damaged, new) and exit; nothing is run or written.")
    mode.add_argument("--table", action="store_true", help="Only (re)write the results table and figure from the "
                      "finished cells, e.g. after all shards are done.")
    mode.add_argument("--compare", nargs=2, metavar=("METHOD_A", "METHOD_B"),
                      help="Paired bootstrap of the test AUC difference A - B on the same test images (method names "
                           "as in the table); prints it and exits.")
    parser.add_argument("--shard", metavar="I/N", help="Run only the cells whose index modulo N is I: start N "
                        "commands (one per machine, or per GPU with CUDA_VISIBLE_DEVICES) to share one grid.")
    parser.add_argument("--launcher", choices=("python", "accelerate"), default="python",
                        help="python: each cell runs `hf-medbeit train CELL.yaml`; accelerate: `accelerate launch "
                             "--config_file FILE -m hf_medbeit.finetune CELL.yaml` (needs --accelerate_config).")
    parser.add_argument("--accelerate_config", metavar="FILE", help="accelerate config for --launcher accelerate, "
                        "e.g. configs/accelerate/multi_gpu.yaml.")
    parser.add_argument("--resamples", type=int, default=2000, help="Bootstrap resamples of the paired test "
                        "(default 2000).")
    parser.error = _argparse_error  # one line, not usage + message
    return parser


def _argparse_error(message: str):
    raise UserError(f"{message}; hf-medbeit study --help lists the options")


def list_cells(grid: Grid, cells: list[Cell]) -> None:
    states = {cell.name: cell_state(cell) for cell in cells}
    counts = ", ".join(f"{sum(state == kind for state in states.values())} {kind}"
                       for kind in ("finished", "unfinished", "damaged", "new")
                       if any(state == kind for state in states.values()))
    print(f"{grid.path}: {len(cells)} of {len(grid.cells)} cells in {grid.root} ({counts})")
    for cell in cells:
        print(f"{cell.index:4d}  {states[cell.name]:<10}  {cell.name}")


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    grid = load_grid(args.grid)
    shard_index, shard_count = parse_shard(args.shard)
    if args.resamples < 100:
        raise UserError(f"--resamples {args.resamples} is too few for a 95% interval; use 1000 or more (default 2000)")
    if args.compare:
        from .results_table import compare_command

        compare_command(grid, *args.compare, n_resamples=args.resamples)
        return
    if args.table:
        from .results_table import write_results

        written = write_results(grid, n_resamples=args.resamples)
        print(f"hf-medbeit: study table: {', '.join(map(str, written))}")
        return
    if args.launcher == "accelerate":
        if not args.accelerate_config:
            raise UserError("--launcher accelerate needs an accelerate config; add --accelerate_config FILE "
                            "(e.g. configs/accelerate/multi_gpu.yaml)")
        if not Path(args.accelerate_config).is_file():
            raise UserError(f"--accelerate_config {args.accelerate_config} does not exist; check the path")
    elif args.accelerate_config:
        raise UserError("--accelerate_config applies to --launcher accelerate; add --launcher accelerate or drop it")
    validate_cells(grid)
    check_not_stale(grid)
    cells = shard_cells(grid.cells, shard_index, shard_count)
    if args.list:
        list_cells(grid, cells)
        return
    failures = run_study(grid, cells, args.launcher, args.accelerate_config)
    from .results_table import write_results

    try:
        written = write_results(grid, n_resamples=args.resamples)
        print(f"hf-medbeit: study table: {', '.join(map(str, written))}")
    except UserError as error:  # no finished cell yet: the failures below say why
        print(f"hf-medbeit: no table: {error}", file=sys.stderr)
    if failures:
        raise StudyFailed(f"{len(failures)} of {len(cells)} cells failed: {'; '.join(failures)}; see their .log files "
                          f"in {grid.root}, fix the cause and run the same command again (finished cells are skipped)")
