"""`--config FILE` and `--save-config FILE`: a command's options saved as JSON and replayed.

Why its own module: replay must treat the file exactly like a command line the user typed. The
file's values become argparse *defaults* (so whatever the command line sets wins, whatever the
flag's spelling or abbreviation), and each value is converted and checked through its option's
own type, choices and nargs, so a wrong value is one line naming the file and the key, not a
traceback later (issue 9, item 7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phenolens.errors import PhenolensError

# "subcommand": the dest of a command's own commands (`phenolens classifier train`)
NOT_OPTIONS = ("func", "config", "save_config", "command", "subcommand", "invocation")


def csv_list(text: str) -> list[str]:
    """The type of options such as --conditions A,B,C."""
    return [t.strip() for t in text.split(",") if t.strip()]


class _ConfigValueError(Exception):
    """A --config value that its option would not accept (the message says what was expected)."""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ARGS ran, descending into a command's own commands
    (`phenolens classifier train` -> the parser of `train`)."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None:
            return parser
        parser = action.choices[getattr(args, action.dest)]


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's parser, nested ones included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += [sub, *_all_subparsers(sub)]
    return found


def _convert_one(action: argparse.Action, value):
    """One file value through the option's type, as argparse converts a command-line word.

    Text goes through the option's `type` exactly as on the command line; JSON numbers and lists
    (as --save-config writes them) are accepted only where the option's type would make them.
    """
    kind = action.type
    if isinstance(value, str):
        if kind is None:
            return value
        try:
            return kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            name = getattr(kind, "__name__", "value").lstrip("_")
            raise _ConfigValueError(f"invalid {name} value {value!r}") from None
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is csv_list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    expected = {int: "a whole number", float: "a number", csv_list: "a list of names or comma-separated text"}
    raise _ConfigValueError(f"expected {expected.get(kind, 'text')}, got {json.dumps(value)}")


def _check_choice(action: argparse.Action, value) -> None:
    if action.choices is not None and value not in action.choices:
        raise _ConfigValueError(f"{json.dumps(value) if not isinstance(value, Path) else str(value)!s} is not one "
                                f"of {', '.join(map(str, action.choices))}")


def convert_config_value(action: argparse.Action, value):
    """VALUE from a --config file as the option ACTION would have parsed it; _ConfigValueError if not."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise _ConfigValueError(f"expected true or false, got {json.dumps(value)}")
        return value
    if value is None:
        if action.default is None and not action.required:
            return None
        raise _ConfigValueError("null is not allowed here (the option has no 'unset' value)")
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if many:
        if not isinstance(value, list):
            raise _ConfigValueError(f"expected a list, got {json.dumps(value)}")
        if action.nargs == "+" and not value:
            raise _ConfigValueError("expected at least one value, got an empty list")
        out = [_convert_one(action, v) for v in value]
        for v in out:
            _check_choice(action, v)
        return out
    out = _convert_one(action, value)
    _check_choice(action, out)
    return out


def _read_config(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise PhenolensError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise PhenolensError(f"--config {path}: is a folder, not a JSON file") from None
    except OSError as err:
        raise PhenolensError(f"--config {path}: cannot read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PhenolensError(f"--config {path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise PhenolensError(f"--config {path}: expected a JSON object of option values")
    return values


def config_defaults(sub: argparse.ArgumentParser, path: Path, values: dict, command: str) -> dict:
    """The file's values converted and checked like the command line: {dest: value}.

    Raises PhenolensError naming the file and the key for an unknown key or a value its option
    would refuse (wrong type, not one of the choices, a non-boolean for a switch).
    """
    actions = {a.dest: a for a in sub._actions if a.dest not in NOT_OPTIONS and a.dest != argparse.SUPPRESS
               and not isinstance(a, argparse._HelpAction)}
    converted = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            raise PhenolensError(f"--config {path}: unknown option {key!r} for `phenolens {command}`")
        try:
            converted[key] = convert_config_value(action, value)
        except _ConfigValueError as err:
            flag = action.option_strings[0] if action.option_strings else key.upper()
            raise PhenolensError(f"--config {path}: {key!r} ({flag}): {err}") from None
    return converted


def parse_command(argv: list[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse ARGV; with --config FILE, the file's values become the defaults, so the command line wins.

    Why defaults and not a merge afterwards: argparse then decides what the command line set, so
    abbreviations (`--ste 3`) and flags unlike their destination (`--from` -> source, `--no-judges` ->
    judges) win over the file as they should, and the file's values are checked like typed ones.
    """
        # first pass: only to learn the command and --config (options the file may supply are not yet required)
    relaxed = [a for sub in _all_subparsers(parser) for a in sub._actions if a.required and a.option_strings]
    for a in relaxed:
        a.required = False
    try:
        first = parser.parse_args(argv)
    finally:
        for a in relaxed:
            a.required = True
    path = getattr(first, "config", None)
    if path is None:
        args = parser.parse_args(argv)
    else:
        sub = _leaf_parser(parser, first)
        name = " ".join(filter(None, (first.command, getattr(first, "subcommand", None))))
        defaults = config_defaults(sub, path, _read_config(path), name)
        saved = {a.dest: (a.default, a.required) for a in sub._actions}
        try:
            for a in sub._actions:
                if a.dest in defaults:
                    a.default = defaults[a.dest]
                    if a.option_strings:  # a positional is always named on the command line
                        a.required = False
            args = parser.parse_args(argv)
        finally:
            for a in sub._actions:
                a.default, a.required = saved[a.dest]
    args.invocation = argv
    return args


def save_config(args: argparse.Namespace) -> None:
    """Write the options to --save-config FILE (a missing parent folder is created)."""
    path = getattr(args, "save_config", None)
    if path is None:
        return
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in NOT_OPTIONS}
    from phenolens.atomic import write_json_atomic

    path = Path(path)
    if path.is_dir():
        raise PhenolensError(f"--save-config {path}: is a folder; give a file name, e.g. {path / 'config.json'}")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise PhenolensError(f"--save-config {path}: {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, values)
    except OSError as err:
        raise PhenolensError(f"--save-config {path}: cannot write there ({err.strerror or err})") from None
