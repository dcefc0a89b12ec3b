"""`apply` to a diffusers pipeline folder: a new folder whose text-encoder weight files are patched copies (made as
a single file is patched, writers/checkpoint.py) and whose other files are the input's, hard-linked where the file
system allows and copied where it does not. A pipeline is gigabytes; linking makes the new folder cost only the
text encoders, and neither the input nor the output is ever modified in place afterwards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import safetensors_file
from .atomic import staged_folder
from .checkpoint import patched_tensors, with_patch_record, write_patched_file


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def write_patched_folder(patch, source: Path, files: list, target: Path, differing: list[str], overwrite: bool) -> int:
    """`target`: the pipeline folder `source` with `patch` applied to the weight `files`; returns how many
    tensors were patched (each variant's copy counted)."""
    weight_files = {file.path: file for file in files}
    count = 0
    with staged_folder(target, overwrite) as staging:
        for path in sorted(source.rglob("*")):
            destination = staging / path.relative_to(source)
            if path.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            file = weight_files.get(path)
            replacements = patched_tensors(patch, file) if file else {}
            if replacements:
                metadata = with_patch_record(safetensors_file.metadata(file.header), patch, differing)
                write_patched_file(path, destination, file.header, metadata, replacements)
                count += len(replacements)
            else:
                link_or_copy(path, destination)
    return count
