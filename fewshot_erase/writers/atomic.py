"""Outputs appear whole or not at all: everything is written into a hidden staging path beside the target (same
file system, so the final rename is atomic) and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from ..errors import BadInput, RunFailure

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)  # what a rename onto an existing path says
NAME_KEPT = 100  # bytes of the target's name in its hidden staging names: any name the file system takes leaves room


def hidden(target: Path, kind: str) -> str:
    """The prefix of a hidden staging or trash path beside `target`."""
    return f".{os.fsencode(target.name)[:NAME_KEPT].decode('utf-8', 'ignore')}.{kind}-"


def exists(target: Path) -> bool:
    try:
        return target.exists()
    except OSError as error:  # a name longer than the file system takes, above all
        raise BadInput(f"output {target} cannot be used ({error.strerror or error}); choose a shorter or another path") from None


def check_target(target: Path, overwrite: bool, inputs: tuple[Path, ...] = (), writes: str = "file") -> Path:
    """Refuse what would clobber, nest inside or (with --overwrite) delete the user's inputs, before any work.
    `writes`: "file" or "folder", what the output will be; --overwrite never turns one into the other."""
    target = Path(target).expanduser()
    resolved = target.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source:
            raise BadInput(f"output {target} is the same path as the input {source}; write to a new path")
        if source.is_dir() and resolved.is_relative_to(source):
            raise BadInput(f"output {target} is inside the input folder {source}; write it somewhere else")
        if source.is_relative_to(resolved):
            raise BadInput(f"output {target} contains the input {source}, which replacing it would delete; write it somewhere else")
    if exists(target) and not overwrite:
        raise BadInput(f"output {target} already exists; choose another path or pass --overwrite")
    if overwrite and exists(target):
        _check_same_kind(target, writes)
    if overwrite and target.is_dir():
        _check_replaceable(target, resolved)
    parent = resolved.parent
    if not parent.is_dir():
        raise BadInput(f"the folder {parent} for output {target} does not exist; create it first")
    _check_writable(parent, target)
    return target


# What tops every folder fewshot-erase writes: an erase output, a patched pipeline, drop-in files
OURS = ("erase.json", "model_index.json", "*.safetensors")


def _check_same_kind(target: Path, writes: str) -> None:
    """An earlier output is what this command writes: a file where a file goes, a folder where a folder does. Any
    other is the user's own (a README, a picture), which --overwrite must not delete."""
    if writes == "folder" and not target.is_dir():
        raise BadInput(f"output {target} is a file, and this writes a folder; --overwrite replaces only an earlier "
                       "output of the same kind: choose another path")
    if writes == "file" and target.is_dir():
        raise BadInput(f"output {target} is a folder, and this writes a file; --overwrite replaces only an earlier "
                       "output of the same kind: choose another path")


def _check_replaceable(target: Path, resolved: Path) -> None:
    """--overwrite replaces an earlier output, never a folder of the user's own or the one they stand in."""
    if Path.cwd().resolve().is_relative_to(resolved):
        raise BadInput(f"output {target} is the current folder or holds it; replacing it would delete it from under "
                       "you: write to a new folder")
    try:
        others = any(target.iterdir()) and not any(next(target.glob(pattern), None) for pattern in OURS)
    except OSError as error:
        raise BadInput(f"cannot list output {target} ({error.strerror or error}); choose another path") from None
    if others:
        raise BadInput(f"output {target} is a folder of other files (no {', '.join(OURS)}); --overwrite replaces only "
                       "what fewshot-erase wrote: choose another path")


def _check_writable(folder: Path, target: Path) -> None:
    """Try it rather than trust permission bits: they do not bind root, and a read-only mount shows only on writing."""
    try:
        probe = tempfile.mkdtemp(prefix=hidden(target, "partial"), dir=folder)
    except OSError as error:
        raise BadInput(f"cannot write to {folder} ({error.strerror or error}); choose a writable output path") from None
    os.rmdir(probe)


def _write_failed(target: Path, error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL:
        return f"writing {target} failed: the disk is full ({reason}); nothing was written. Free space or choose another path"
    if error.errno in NOT_WRITABLE:
        return f"writing {target} failed ({reason}); nothing was written. Choose a writable output path"
    return f"writing {target} failed ({reason}); nothing was written. Check the disk or choose another path"


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C between moving the old output aside and renaming the new one in would lose both. The renames take
    microseconds, so an interrupt arriving then waits for them, and the run, complete by then, stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _rename_new(staging: Path, target: Path) -> None:
    try:
        os.rename(staging, target)
    except OSError as error:
        if error.errno in TAKEN:  # another run won the race to create the same output
            raise RunFailure(f"output {target} was created by another run at the same time; nothing of this run was kept") from None
        raise


def _replace(staging: Path, target: Path, overwrite: bool) -> None:
    with _interrupts_held():
        if not (target.exists() or target.is_symlink()):
            _rename_new(staging, target)
            return
        if not overwrite:
            raise RunFailure(f"output {target} appeared while this run was working (another run?); nothing of this run was kept. Choose another path or pass --overwrite")
        # Move the old output aside first so the new one lands by a single rename; then drop the old. Should the
        # rename fail, the old output goes back; should even that fail, it stays whole in the .old- folder.
        trash = Path(tempfile.mkdtemp(prefix=hidden(target, "old"), dir=target.parent))
        try:
            os.replace(target, trash / "old")
        except FileNotFoundError:
            os.rmdir(trash)
            raise RunFailure(f"output {target} was replaced by another run at the same time; nothing of this run was kept") from None
        except BaseException:
            os.rmdir(trash)
            raise
        try:
            _rename_new(staging, target)
        except BaseException:
            os.replace(trash / "old", target)
            os.rmdir(trash)
            raise
        shutil.rmtree(trash, ignore_errors=True)


def _umask() -> int:
    current = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(current)
    return current


def _ordinary_mode(path: Path, mode: int) -> None:
    """mkdtemp and mkstemp stage privately (0700, 0600); the output gets what any new file or folder gets under the
    user's umask, so that a service account or a colleague can read it."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def staged_folder(target: Path, overwrite: bool):
    """Yield an empty staging folder; on success it becomes `target`, on any failure it is removed."""
    target = Path(target)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=hidden(target, "partial"), dir=target.parent))
        _ordinary_mode(staging, 0o777)
        yield staging
        _replace(staging, target, overwrite)
    except OSError as error:
        raise RunFailure(_write_failed(target, error)) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(target: Path, overwrite: bool):
    """Yield a staging file path beside `target`; on success it is renamed to `target`."""
    target = Path(target)
    staging = None
    try:
        handle, name = tempfile.mkstemp(prefix=hidden(target, "partial"), dir=target.parent)
        os.close(handle)
        staging = Path(name)
        _ordinary_mode(staging, 0o666)
        yield staging
        with _interrupts_held():
            if target.exists() and not overwrite:
                raise RunFailure(f"output {target} appeared while this run was working (another run?); nothing of this run was kept. Choose another path or pass --overwrite")
            os.replace(staging, target)
    except OSError as error:
        raise RunFailure(_write_failed(target, error)) from None
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)
