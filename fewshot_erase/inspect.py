"""`fewshot-erase inspect PATH`: what a file or folder is (an `erase` output, an exported patch, a single-file
checkpoint, a diffusers pipeline), its family and text encoders, the erase records it carries, and, given a patch,
whether the patch fits it. Only headers and the tensors a fit check compares are read."""

from __future__ import annotations

from pathlib import Path

from . import safetensors_file
from .base import check_family, mismatches
from .model_files import model_files
from .patch import ERASE_OUTPUT, Patch, is_exported_patch, read_patch, record_in
from .errors import BadInput, python_terms
from .models import PICKLE_SUFFIXES
from .writers.text_encoder import RECORD_NAME

RECORD_FIELDS = ("concept", "images", "base", "settings", "steps", "repair_steps", "effects", "export", "applied")


@python_terms
def inspect(path, patch=None) -> dict:
    path = Path(path).expanduser()
    if not path.exists():
        raise BadInput(f"{path} does not exist; pass a checkpoint, a pipeline folder, an erase output or a patch")
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadInput(f"{path} is a pickle checkpoint, which can run code when opened; it was not read. Convert it to .safetensors first")
    if path.is_file() and path.suffix.lower() != ".safetensors":
        raise BadInput(f"{path} is not a .safetensors file; inspect takes a checkpoint, a diffusers pipeline folder, an erase output or a patch")
    if path.is_dir() and (path / RECORD_NAME).is_file() or _is_exported_patch(path):
        report = _patch_report(read_patch(path))
    else:
        report = _model_report(path)
    if patch is not None:
        if report["kind"] not in ("single-file checkpoint", "diffusers pipeline"):
            raise BadInput(f"--patch checks whether a patch fits a checkpoint or pipeline folder, and {path} is "
                           f"{'an' if report['kind'][0] in 'aeiou' else 'a'} {report['kind']}: pass the checkpoint as "
                           "PATH and the patch after --patch")
        report["patch"] = fits(read_patch(patch), path)
    return {"path": str(path), **report}


def _is_exported_patch(path: Path) -> bool:
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        return False
    record = record_in(safetensors_file.read_header(path), path)
    return record is not None and is_exported_patch(record)


def summary(record: dict) -> dict:
    """What a user asks of an erase record: what was erased, from which pictures and base, and how."""
    return {field: record[field] for field in RECORD_FIELDS if field in record}


def _patch_report(patch: Patch) -> dict:
    return {
        "kind": patch.kind if patch.kind == ERASE_OUTPUT else f"{patch.kind} patch",
        "family": patch.family.name,
        "family_label": patch.family.label,
        "text_encoders": {encoder: {"patched_tensors": len(tensors)} for encoder, tensors in patch.tensors.items()},
        "records": [summary(patch.record)],
    }


def _model_report(path: Path) -> dict:
    family, files = model_files(path, str(path))
    encoders = {}
    for encoder in family.encoders:
        holding = [file for file in files if encoder in file.keys]
        # each layer's first feed-forward matrix (CLIP's fc1, T5's wi or gated wi_0): its input width is the model's
        fc1 = [(file, name) for file in holding for name in file.keys[encoder]
               if name.endswith(("fc1.weight", "DenseReluDense.wi.weight", "DenseReluDense.wi_0.weight"))]
        encoders[encoder] = {
            "layout": holding[0].layouts[encoder],
            "layers": len({name for _, name in fc1}),
            "width": fc1[0][0].header[fc1[0][0].keys[encoder][fc1[0][1]]]["shape"][1] if fc1 else None,
            "dtypes": sorted({file.dtype(encoder, name) for file in holding for name in file.keys[encoder]}),
            "files": [str(file.path.relative_to(path)) if path.is_dir() else path.name for file in holding],
        }
    records = {}
    for file in files:
        record = record_in(file.header, file.path)
        if record is not None:
            records.setdefault(repr(sorted(summary(record).items())), summary(record))
    kind = "diffusers pipeline" if path.is_dir() else "single-file checkpoint"
    return {"kind": kind, "family": family.name, "family_label": family.label, "text_encoders": encoders,
            "records": list(records.values())}


def fits(patch: Patch, path: Path) -> dict:
    """Whether `apply` would take `patch` for this model without --force, and if not, why."""
    found = {"path": str(patch.source), "kind": patch.kind}
    family, files = model_files(path, str(path))
    try:
        check_family(patch, family, str(path))
        differing = mismatches(patch, files, str(path))
    except BadInput as error:
        return {**found, "fits": False, "reason": str(error)}
    applied = bool(differing) and any(_same_erase(record_in(file.header, file.path), patch.record) for file in files)
    return {**found, "fits": not differing, "differing": differing, "applied_here": applied}


def _same_erase(record: dict | None, other: dict) -> bool:
    """The same erase, whether exported or applied since (each adds its own field to the record)."""
    def erase(r: dict) -> dict:
        return {field: value for field, value in summary(r).items() if field not in ("export", "applied")}
    return record is not None and erase(record) == erase(other)
