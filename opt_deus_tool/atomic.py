"""Output folders and files written whole or not at all.

Output goes to a hidden scratch sibling `.NAME.tmp-HOST-PID`, renamed into place when complete. An error,
Ctrl-C or SIGTERM deletes it; a process killed outright (SIGKILL, the OOM killer) leaves it, and the next
run into the same folder on the same host removes it once that process is gone. Messages name parameters
in backticks (`out`); the command lines turn them into the flags the user typed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path

from opt_deus_tool import CheckpointError

SCRATCH_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", os.uname().nodename)
_SCRATCH_NAME = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)")


class Interrupted(BaseException):
    """SIGTERM arrived while an output folder was being written; its temporary folder is gone. A
    BaseException like KeyboardInterrupt (which SIGINT raises), so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def check_output_folder(path, inputs=(), overwrite: bool = False, name: str = "`out`"):
    """Refuse an output folder that would destroy something: one that is, contains or lies inside an
    input (`inputs`: (name, path) pairs), a file, or a non-empty folder without `overwrite`."""
    path, target = Path(path), Path(path).resolve()
    for what, source in inputs:
        if source is None:
            continue
        source_path = Path(source).resolve()
        if target == source_path:
            relation = "is"
        elif target in source_path.parents:
            relation = "contains"
        elif source_path in target.parents:
            relation = "is inside"
        else:
            continue
        raise CheckpointError(f"{name} {path}: {relation} the input {what} {source}; "
                              f"choose an output folder outside every input")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{name} {path}: is a file, not a folder")
    # Replacing the working directory or the home folder (or a folder above either) is never what
    # `--out . --overwrite` or a mistyped `--out ~` meant.
    for what, folder in (("the current directory", Path.cwd().resolve()), ("the home folder", Path.home().resolve())):
        if target == folder or target in folder.parents:
            raise CheckpointError(f"{name} {path}: is {what} or a folder above it; choose a new folder for the output")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise CheckpointError(f"{name} {path}: already exists and is not empty (pass `overwrite` to replace it)")


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_scratch(folder: Path, name: str | None):
    # Scratch files and folders for NAME (None: any name, in a folder one run owns) left by a dead
    # process on this host. Another host's, or a live process's, are left alone: on a shared file
    # system that run may still be writing.
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        m = _SCRATCH_NAME.fullmatch(entry.name)
        if not m or name not in (None, m["name"]) or m["host"] != SCRATCH_HOST:
            continue
        try:
            os.kill(int(m["pid"]), 0)  # signal 0 only asks whether that process exists
        except ProcessLookupError:
            remove(entry)
        except PermissionError:  # it exists, another user's
            pass


def scratch_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{SCRATCH_HOST}-{os.getpid()}"


def write_text_atomic(path, text: str):
    # One file written whole or not at all: a scratch file beside it, then a rename.
    path = Path(path)
    tmp = scratch_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


class AtomicFolder:
    """Write a folder into a hidden temporary sibling, then rename it into place:

        with AtomicFolder(out, overwrite=True, inputs=[("`base`", base)]) as folder:
            ... write into folder.tmp ...
            folder.commit()

    The target is checked first (check_output_folder). Leaving the block without commit deletes the
    temporary folder; an existing target is moved aside and deleted only once the new folder is in
    place. While the block runs, SIGTERM (if nobody else handles it) raises Interrupted, so that the
    cleanup runs instead of the process dying.
    """

    def __init__(self, path, *, overwrite: bool = False, inputs=(), name: str = "`out`"):
        check_output_folder(path, inputs, overwrite, name)
        self.path = Path(path).absolute()
        self.tmp = scratch_path(self.path)
        self.committed = False
        self._previous_sigterm = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(self.path.parent, self.path.name)
        remove(self.tmp)  # left by an earlier process with our pid
        self.tmp.mkdir()
        on_main_thread = threading.current_thread() is threading.main_thread()
        if on_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    @staticmethod
    def _on_sigterm(signum, frame):
        raise Interrupted(signum)

    def commit(self):
        # Signals wait while the two renames run, so the target is never left missing between them.
        old = self.path.parent / f".{self.path.name}.old-{SCRATCH_HOST}-{os.getpid()}"
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            self.committed = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        remove(old)

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            remove(self.tmp)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
