"""`apply`: a checkpoint (a single file or a diffusers folder) with a patch applied to its text encoder(s), written
as a new file or folder; the input is never modified."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from . import families
from .base import check_family, mismatches, refuse_other_base
from .errors import BadInput, EraseWarning, python_terms
from .model_files import model_files, refuse_quantised
from .patch import read_patch


@dataclass(frozen=True)
class ApplyResult:
    output: Path
    family: families.Family
    patch_kind: str
    patched: int  # tensors written, counting each copy (a folder's fp32 and fp16 variants)
    forced: list[str]  # tensors whose base differed, patched anyway with --force

    def summary(self) -> dict:
        return {"output": str(self.output), "family": self.family.name, "patch": self.patch_kind,
                "patched_tensors": self.patched, "forced": self.forced}


@python_terms
def apply(patch, checkpoint, output, *, force: bool = False, overwrite: bool = False,
          allow_pickle: bool = False) -> ApplyResult:
    """Write `output`: `checkpoint` (a single file or a diffusers folder) with `patch` applied to its text
    encoder(s); every other tensor and file as in the input, which is never modified."""
    import tempfile

    from .models import PICKLE_SUFFIXES, pickle_to_safetensors
    from .writers.atomic import check_target
    from .writers.checkpoint import write_patched_checkpoint
    from .writers.pipeline_folder import write_patched_folder

    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.exists():
        raise BadInput(f"checkpoint {checkpoint} does not exist; pass a .safetensors checkpoint or a diffusers pipeline folder")
    if checkpoint.is_file() and checkpoint.suffix.lower() not in (".safetensors",) + PICKLE_SUFFIXES:
        raise BadInput(f"checkpoint {checkpoint} is not a .safetensors file; pass a .safetensors checkpoint or a "
                       "diffusers pipeline folder")
    pickled = checkpoint.is_file() and checkpoint.suffix.lower() in PICKLE_SUFFIXES
    if pickled and not allow_pickle:
        raise BadInput(f"{checkpoint} is a pickle checkpoint, which can run code when loaded; convert it to .safetensors or pass --allow-pickle")
    if checkpoint.is_file() and Path(output).suffix.lower() != ".safetensors":
        raise BadInput(f"output {output} must end in .safetensors: the patched checkpoint is written as safetensors")
    if checkpoint.is_dir() and Path(output).suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        raise BadInput(f"output {output} names a {Path(output).suffix} file, but a pipeline folder is patched into a "
                       "folder; name a folder (apply to a single-file checkpoint to write one file)")
    target = check_target(Path(output), overwrite, inputs=(checkpoint, Path(patch)),
                          writes="file" if checkpoint.is_file() else "folder")
    loaded = read_patch(patch)
    with tempfile.TemporaryDirectory(prefix="fewshot-erase-") as workdir:
        source = pickle_to_safetensors(checkpoint, Path(workdir)) if pickled else checkpoint
        family, files = model_files(source, str(checkpoint))
        check_family(loaded, family, str(checkpoint))
        refuse_quantised(files, loaded.tensors, "a patch cannot be written into faithfully (its changes are smaller than that format's steps)",
                         "apply to an fp16, bf16 or fp32 copy of the checkpoint, then quantise that if you need to")
        differing = mismatches(loaded, files, str(checkpoint))
        if not force:
            refuse_other_base(loaded, differing, str(checkpoint), "use that model, or pass --force to patch this one anyway")
        elif differing:
            warnings.warn(f"{checkpoint} is not the patch's base ({len(differing)} of {loaded.count} tensors differ); patched anyway (--force)",
                          EraseWarning, stacklevel=2)
        if checkpoint.is_dir():
            written = write_patched_folder(loaded, checkpoint, files, target, differing, overwrite)
        else:
            written = write_patched_checkpoint(loaded, files[0], target, differing, overwrite)
    return ApplyResult(target, family, loaded.kind, written, differing)
