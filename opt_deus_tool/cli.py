"""What the three commands share: argparse types, one-line errors, and flag names for library parameters.

Every error a user can cause ends in one line on stderr, `PROG: error: what, where, how to fix`, and exit code 2
(130/143 for SIGINT/SIGTERM); progress lines may come before it. The reference files name their parameters in
backticks (`num_new`, `block_size`); a command shows the flag the user typed instead (--new-layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
import os
import re
import sys
from typing import Callable

from opt_deus_tool.atomic import Interrupted
from opt_deus_tool.checkpoint import parse_size
from opt_deus_tool.data import BYTE_VOCAB_LIMIT

BYTE_TOKENIZER_HELP = ("use UTF-8 bytes when the model folder has no tokenizer.json (automatic for a vocabulary "
                       f"of at most {BYTE_VOCAB_LIMIT})")


class OneLineArgumentParser(argparse.ArgumentParser):
    # argparse prints the whole usage block before an error; our tools promise one line on stderr
    # (what went wrong and which flag), exit code 2. --help still prints the full usage.
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Every default in --help, but no "(default: None)" where None only means "not given" (a required flag).
    def _get_help_string(self, action):
        return action.help if action.required or action.default is None else super()._get_help_string(action)


def positive_int(text: str) -> int:
    # argparse type for counts: "0", "-3" and "abc" all end in the same one-line error.
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def any_float(text: str) -> float:
    # argparse type for floats whose range the dataclass checks (inf may be meaningful: max_marginal_error).
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def any_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def non_negative_int(text: str) -> int:
    # argparse type for counts where 0 means something (--threads 0: torch's default).
    value = any_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    # argparse type for an integer with a floor that has a reason (calibration text: enough tokens to be text).
    def parse(text: str) -> int:
        value = any_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def comma_list(item: Callable[[str], object], distinct: bool = False, choices=None) -> Callable[[str], list]:
    """argparse type for a non-empty comma list, each entry parsed by `item` (an argparse type), from `choices`
    when given; distinct: a repeated entry is refused (seeds 0,0 would pair a run with itself)."""
    def parse(text: str) -> list:
        entries = [x.strip() for x in text.split(",")]
        if not any(entries) or not all(entries):
            raise argparse.ArgumentTypeError(f"expected a comma list without empty entries, got {text!r}")
        values = []
        for entry in entries:
            try:
                values.append(item(entry))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
            if choices is not None and values[-1] not in choices:
                raise argparse.ArgumentTypeError(f"unknown {entry!r} in {text!r} (choose from {', '.join(choices)})")
            if distinct and values[-1] in values[:-1]:
                raise argparse.ArgumentTypeError(f"{entry!r} appears twice in {text!r}; give each once")
        return values
    return parse


# How a field's annotation becomes a flag's type (the dataclass checks the value's range: one check per rule).
ANNOTATION_TYPES = {int: any_int, float: any_float, str: str}


def add_fields(parser: argparse.ArgumentParser, cls, types: dict[str, Callable] | None = None,
               into: dict | None = None) -> list[str]:
    """One flag per field of the dataclass `cls`, its one home: --name (dashes for underscores), the field's
    default, its metadata's help (and choices), a type from its annotation (`types` overrides one: name ->
    argparse type). bool fields get --name / --no-name. into: field -> the argument group (e.g. mutually
    exclusive) its flag joins. Returns the field names, in order."""
    hints, types, into = typing.get_type_hints(cls), types or {}, into or {}
    for f in dataclasses.fields(cls):
        kind = typing.get_args(hints[f.name]) or (hints[f.name],)  # `int | None` -> (int, NoneType)
        options = {"default": f.default, "help": f.metadata.get("help", ""), "dest": f.name}
        if f.name in types:
            options["type"] = types[f.name]
        elif bool in kind:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = ANNOTATION_TYPES[kind[0]]
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        into.get(f.name, parser).add_argument("--" + f.name.replace("_", "-"), **options)
    return [f.name for f in dataclasses.fields(cls)]


def field_values(flags: argparse.Namespace, cls) -> dict:
    # The parsed flags that are fields of `cls`: its constructor's keywords.
    return {f.name: getattr(flags, f.name) for f in dataclasses.fields(cls)}


def flag_names(*names: str, **renamed: str) -> dict[str, str]:
    # Library parameter -> the flag that sets it: the name with dashes, unless renamed (num_new="--new-layers").
    return {**{name: "--" + name.replace("_", "-") for name in names}, **renamed}


def flag_message(message: str, flags: dict[str, str]) -> str:
    # `num_new` -> --new-layers; a parameter no flag sets loses only its backticks. One line.
    return " ".join(re.sub(r"`(\w+)`", lambda m: flags.get(m[1], m[1]), message).split())


def run_command(prog: str, command: Callable[[], int], flags: dict[str, str], where: str | None = None,
                user_errors: tuple = ()) -> int:
    """command()'s exit code, or one line on stderr for what a user can cause: a bad request (ValueError:
    GrowthError, TrainError, CheckpointError), the file system (a full disk, a read-only folder), a signal
    before the work could finish. where: the output named when the file system names no file."""
    try:
        return command()
    except (ValueError, *user_errors) as e:
        message, code = str(e), 2
    except OSError as e:
        message, code = f"{e.filename or where}: {e.strerror or e}" if e.filename or where else str(e.strerror or e), 2
    except Interrupted as e:
        message, code = f"{e}; nothing written", 128 + e.signum
    except KeyboardInterrupt as e:
        message, code = (str(e.args[0]) if e.args else "stopped by SIGINT; nothing written"), 130
    log_to_stderr(f"{prog}: error: {flag_message(message, flags)}")
    return code


def log_to_stderr(*parts):
    # Progress goes to stderr, stdout stays for results. A stderr its reader closed (`2>&1 | head -1`) or that
    # cannot take more (`2>/dev/null` on a full disk, `2>/dev/full`) must never stop the work: lines are dropped.
    try:
        print(*parts, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # BrokenPipeError, ENOSPC; ValueError: stderr already closed
        sys.stderr = open(os.devnull, "w")
