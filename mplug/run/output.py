"""The output folder of mplug.run.train and mplug.run.evaluate: an exclusive lock for the run's life, refusing to
overwrite an earlier run or earlier results (unless --resume / --overwrite), removing the temporary files a killed
save left behind, and reading back log.jsonl."""
from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

LOCK = ".mplug_run.lock"
LOG = "log.jsonl"
# What mplug.run.train writes (and --overwrite removes); runtime.atomic_write's temporaries are ".<name>.<random>.tmp".
RUN_PATTERNS = ("checkpoint_last.pth", "checkpoint_step*.pth", LOG)
TEMPORARY_PATTERNS = tuple(f".{pattern}.*.tmp" for pattern in RUN_PATTERNS)


class OutputLock:
    """An exclusive fcntl.flock on <folder>/.mplug_run.lock holding this process's pid and host; release() empties it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.handle.close()
            raise ValueError(f"--output {os.fspath(folder)!r} is in use by another run ({holder or 'holder unknown'}, lock "
                             f"file {self.path}); wait for it to end or choose another --output") from None
        stale = self._holder()
        if stale:
            print(f"--output {os.fspath(folder)}: taking over the lock of a run that ended without releasing it "
                  f"({stale}; it holds no lock any more, so that process is gone)", file=sys.stderr)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        self.handle.flush()

    def _holder(self) -> str:
        self.handle.seek(0)
        return self.handle.read().strip()

    def release(self) -> None:
        """Empty the lock file (it stays: unlinking a locked file races with a run opening it) and unlock."""
        if self.handle.closed:
            return
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.flush()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run_files(folder: Path, patterns=RUN_PATTERNS) -> List[Path]:
    """The files of ``patterns`` in folder, sorted."""
    return sorted({path for pattern in patterns for path in Path(folder).glob(pattern) if path.is_file()})


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Remove the temporary files a killed save of this run's files left (call holding the folder's lock) -> them."""
    stale = run_files(folder, TEMPORARY_PATTERNS)
    for path in stale:
        path.unlink()
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save: {[path.name for path in stale]}", file=sys.stderr)
    return stale


def open_run_output(output, resume: Optional[str], overwrite: bool) -> OutputLock:
    """Create and lock a training run's --output; an earlier run in it is refused unless --resume names this folder
    (continue it) or --overwrite (its files are removed first); stale temporaries are removed. -> the held lock."""
    folder = Path(output)
    if resume is not None and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run, --overwrite replaces it")
    folder.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(folder)
    try:
        remove_stale_temporaries(folder)
        earlier = run_files(folder)
        continuing = resume is not None and Path(resume).resolve() == folder.resolve()
        if earlier and overwrite:
            for path in earlier:
                path.unlink()
            print(f"--overwrite: removed {[path.name for path in earlier]} from {folder}", file=sys.stderr)
        elif earlier and not continuing:
            raise ValueError(f"--output {os.fspath(output)!r} already holds a run ({', '.join(p.name for p in earlier)}); "
                             f"pass --resume {os.fspath(output)} to continue it, --overwrite to replace it, or choose "
                             f"another --output")
    except BaseException:
        lock.release()
        raise
    return lock


def check_result_output(output, names, overwrite: bool) -> None:
    """Before an evaluation: create --output, check it is writable, and refuse result files already there (unless
    --overwrite) or a result name taken by a folder."""
    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"--output {os.fspath(output)!r} cannot be written: {error}") from None
    for name in names:
        path = folder / name
        if path.is_dir():
            raise ValueError(f"--output {os.fspath(output)!r}: {name} is a folder, where the results go")
        if path.exists() and not overwrite:
            raise ValueError(f"--output {os.fspath(output)!r} already holds {name}; pass --overwrite to replace it or "
                             f"choose another --output")


def read_log(path: Path) -> List[dict]:
    """The records of log.jsonl; a torn last line (a run killed while writing it) is dropped with a note, any other
    bad line raises ValueError naming the file and line."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                print(f"{path}: dropped its torn last line {number} (a run killed while writing it)", file=sys.stderr)
                break
            raise ValueError(f"{path}: line {number} is not JSON ({error}); is it a log of mplug.run.train?") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} has no integer 'step'; it is not a log of mplug.run.train")
        records.append(record)
    return records


def finite_or_text(value):
    """value with every non-finite float (nested in lists and dicts too) replaced by its text ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite_or_text(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(item) for item in value]
    return value


def json_line(record: dict) -> str:
    """One strict-JSON line (non-finite floats written as text: bare NaN is not JSON)."""
    return json.dumps(finite_or_text(record), allow_nan=False) + "\n"
