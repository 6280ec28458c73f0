"""Reading what users hand the tool: JSON that may be malformed or hostile, paths that may not be regular files.

Every failure is one error naming the file (and line): a config nested 100 000 deep, an integer of 5000 digits,
a lone surrogate in a document, a FIFO where a file must be read twice.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path


def parse_json(text: str, where: str, error: type[Exception]):
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's 4300-digit conversion limit
        raise error(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None


def read_json(path, error: type[Exception]):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_json(text, str(path), error)


def read_json_object(path, error: type[Exception], missing_ok: bool = False) -> dict:
    # {} for an absent file when missing_ok; a file that is present must hold a JSON object.
    if missing_ok and not Path(path).exists():
        return {}
    value = read_json(path, error)
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object")
    return value


def check_text(text: str, where: str, error: type[Exception]) -> str:
    # JSON can spell a lone surrogate ("\ud800"), which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: text holds a lone surrogate (\\ud800-\\udfff), not valid Unicode") from None
    return text


def not_a_file(path) -> str | None:
    """Why `path` is not a regular file one can read (twice), or None if it is one."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "a dangling symlink"
    if not path.exists():
        return "no such file"
    mode = path.stat().st_mode
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (a pipe such as <(zcat ...) can be read only once: "
                                                        "write it to a file first)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((what for test, what in kinds if test(mode)), None)
