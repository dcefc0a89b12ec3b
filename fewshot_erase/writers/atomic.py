"""Outputs appear whole or not at all: everything is written into a hidden staging path beside the target (same
file system, so the final rename is atomic) and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BadInput, RunFailure


def check_target(target: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse what would clobber or nest inside the user's inputs, before any work is done."""
    target = Path(target).expanduser()
    resolved = target.resolve()
    if target.exists() and not overwrite:
        raise BadInput(f"output {target} already exists; choose another path or pass --overwrite")
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source:
            raise BadInput(f"output {target} is the same path as the input {source}; write to a new path")
        if source.is_dir() and resolved.is_relative_to(source):
            raise BadInput(f"output {target} is inside the input folder {source}; write it somewhere else")
    parent = resolved.parent
    if not parent.is_dir():
        raise BadInput(f"the folder {parent} for output {target} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"cannot write to {parent} (read-only or no permission); choose a writable output path")
    return target


def _replace(staging: Path, target: Path, overwrite: bool) -> None:
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise BadInput(f"output {target} appeared while this run was working; choose another path or pass --overwrite")
        # Move the old output aside first so the new one lands by a single rename; then drop the old.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / "old")
        try:
            os.rename(staging, target)
        except OSError:
            os.replace(trash / "old", target)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(staging, target)
    except OSError as error:  # another run won the race to create the same output
        raise RunFailure(f"output {target} was created by another run at the same time ({error.strerror}); nothing of this run was kept") from None


@contextlib.contextmanager
def staged_folder(target: Path, overwrite: bool):
    """Yield an empty staging folder; on success it becomes `target`, on any failure it is removed."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        _replace(staging, target, overwrite)
    except OSError as error:
        raise RunFailure(f"writing {target} failed ({error.strerror or error}); nothing was written. Free disk space or choose another path") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(target: Path, overwrite: bool):
    """Yield a staging file path beside `target`; on success it is renamed to `target`."""
    target = Path(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        if target.exists() and not overwrite:
            raise BadInput(f"output {target} appeared while this run was working; choose another path or pass --overwrite")
        os.replace(staging, target)
    except OSError as error:
        raise RunFailure(f"writing {target} failed ({error.strerror or error}); nothing was written. Free disk space or choose another path") from None
    finally:
        staging.unlink(missing_ok=True)
