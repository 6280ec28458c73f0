"""Output folders and files written whole or not at all, by one process at a time.

Output goes to a hidden scratch sibling `.NAME.tmp-HOST-PID`, renamed into place when complete. An error, Ctrl-C
or a terminating signal deletes it; a process killed outright (SIGKILL, the OOM killer) leaves it, and the next
run into the same folder on the same host removes it once that process is gone. While a process writes a target
it holds an exclusive lock on it (`.NAME.lock` beside it): a second writer fails at once instead of racing it.
Messages name parameters in backticks (`out`); the command lines turn them into the flags the user typed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

from opt_deus_tool import CheckpointError

SCRATCH_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", os.uname().nodename)[:64]
_SCRATCH_NAME = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)")
# Signals that end a process by default: while a folder is written each one deletes the scratch folder first.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(BaseException):
    """A terminating signal arrived while an output folder was being written; its temporary folder is gone. A
    BaseException like KeyboardInterrupt (which SIGINT raises), so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def model_folder_problem(path: Path) -> str | None:
    # What `overwrite` may replace where a model goes: a folder this tool wrote (growth_report.json) or one
    # holding a model's config.json (a JSON object with a model_type), never one that only has a file of that name.
    if (path / "growth_report.json").is_file():
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and isinstance(config.get("model_type"), str):
            return None
    except (OSError, ValueError, RecursionError):
        pass
    return "holds files but no config.json of a model (one with a model_type) nor growth_report.json"


def check_output_folder(path, inputs=(), overwrite: bool = False, name: str = "`out`",
                        replaceable: Callable[[Path], str | None] | None = None):
    """Refuse an output folder that would destroy something: one that is, contains or lies inside an input
    (`inputs`: (name, path) pairs), a file or a dangling symlink, a non-empty folder without `overwrite`, or one
    that `replaceable` (path -> why not, or None) says is not an earlier output."""
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
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{name} {path}: is a dangling symlink; choose a folder")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{name} {path}: is a file, not a folder")
    # Replacing the working directory or the home folder (or a folder above either) is never what
    # `--out . --overwrite` or a mistyped `--out ~` meant.
    for what, folder in (("the current directory", Path.cwd().resolve()), ("the home folder", Path.home().resolve())):
        if target == folder or target in folder.parents:
            raise CheckpointError(f"{name} {path}: is {what} or a folder above it; choose a new folder for the output")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{name} {path}: already exists and is not empty (pass `overwrite` to replace it)")
        problem = replaceable(path) if replaceable is not None else None
        if problem:
            raise CheckpointError(f"{name} {path}: {problem}; `overwrite` replaces only an earlier output (choose a "
                                  f"new or empty folder)")


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def scratch_name(name: str) -> str:
    # Short enough that `.NAME.tmp-HOST-PID` fits a file name (255 bytes) whatever the target's name.
    if len(name.encode()) <= 100:
        return name
    return name.encode()[:80].decode(errors="ignore") + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def remove_stale_scratch(folder: Path, name: str | None):
    # Scratch files and folders for NAME (None: any name, in a folder one run owns) left by a dead
    # process on this host. Another host's, or a live process's, are left alone: on a shared file
    # system that run may still be writing.
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        m = _SCRATCH_NAME.fullmatch(entry.name)
        if not m or (name is not None and m["name"] != scratch_name(name)) or m["host"] != SCRATCH_HOST:
            continue
        try:
            os.kill(int(m["pid"]), 0)  # signal 0 only asks whether that process exists
        except ProcessLookupError:
            remove(entry)
        except PermissionError:  # it exists, another user's
            pass


def scratch_path(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{scratch_name(path.name)}.{kind}-{SCRATCH_HOST}-{os.getpid()}"


def write_text_atomic(path, text: str):
    # One regular file written whole or not at all: a scratch file beside it, then a rename. A symlink, a
    # device or a FIFO at `path` is refused: the rename would replace it (as root, /dev/null itself).
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CheckpointError(f"{path}: exists and is not a regular file (a symlink, a folder, a device or a FIFO); "
                              f"choose a file path")
    tmp = scratch_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk's error names no file
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


class FolderLock:
    """An exclusive lock on a target path while this process writes it: fcntl.flock on `.NAME.lock` beside it,
    which the kernel releases however the process ends. A second writer fails at once, naming the holder."""

    def __init__(self, path, name: str = "`out`"):
        self.path, self.name = Path(path).absolute(), name
        self.lock_path = self.path.parent / f".{scratch_name(self.path.name)}.lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(f"{self.name} {self.path}: another process (pid {holder}) is writing it "
                                      f"right now; wait for it to finish or choose another folder") from None
            try:  # the holder we waited for may have removed the file we locked: lock the new one instead
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
            else:
                os.close(fd)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.lock_path.unlink(missing_ok=True)  # while still held, so no one holds a lock on a removed file
        os.close(self.fd)
        self.fd = None


class AtomicFolder:
    """Write a folder into a hidden temporary sibling, then rename it into place:

        with AtomicFolder(out, overwrite=True, inputs=[("`base`", base)]) as folder:
            ... write into folder.tmp ...
            folder.commit()

    The target is checked (check_output_folder), locked (FolderLock), and checked again under the lock: a
    process that wrote it meanwhile has made it an earlier output. Leaving the block without commit deletes
    the temporary folder; an existing target is moved aside and deleted only once the new folder is in place.
    While the block runs, a terminating signal nobody else handles raises Interrupted, so the cleanup runs.
    """

    def __init__(self, path, *, overwrite: bool = False, inputs=(), name: str = "`out`",
                 replaceable: Callable[[Path], str | None] | None = None):
        self.check = dict(inputs=inputs, overwrite=overwrite, name=name, replaceable=replaceable)
        check_output_folder(path, **self.check)
        self.path = Path(path).absolute()
        self.tmp = scratch_path(self.path)
        self.lock = FolderLock(self.path, name)
        self.committed = False
        self._previous_handlers = {}

    def __enter__(self):
        self.lock.__enter__()
        try:
            check_output_folder(self.path, **self.check)
            remove_stale_scratch(self.path.parent, self.path.name)
            remove(self.tmp)  # left by an earlier process with our pid
            self.tmp.mkdir()
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        if threading.current_thread() is threading.main_thread():
            for s in TERMINATING_SIGNALS:
                if signal.getsignal(s) == signal.SIG_DFL:
                    self._previous_handlers[s] = signal.signal(s, self._on_signal)
        return self

    @staticmethod
    def _on_signal(signum, frame):
        raise Interrupted(signum)

    def commit(self):
        # Signals wait while the two renames run, so the target is never left missing between them.
        old = scratch_path(self.path, "old")
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *TERMINATING_SIGNALS})
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
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)
        self.lock.__exit__(None, None, None)
