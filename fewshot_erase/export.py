"""`export`: a small file of what an erase changed, as its feed-forward differences (`delta`) or low-rank factors
of them (`lora-kohya`, `lora-diffusers`), which `apply` and the ecosystem's LoRA loaders take."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from .base import base_path, base_tensors
from .errors import BadInput, EraseWarning, python_terms
from .patch import ERASE_OUTPUT, read_patch
from .record import stable_part
from .writers import EXPORT_FORMATS, delta, drop_in, lora


@dataclass(frozen=True)
class ExportResult:
    output: Path
    report: dict  # what `export` measured; also in the file's record under "export"

    def summary(self) -> dict:
        return {"output": str(self.output), **self.report}


@python_terms
def export(output, fmt: str, target, *, rank: int | None = None, model: str | None = None,
           overwrite: bool = False) -> ExportResult:
    """A small file of what the erase in `output` changed: its feed-forward differences (`delta`), or low-rank
    factors of them (`lora-kohya`, `lora-diffusers`). The differences need the base model's weights: the one the
    erase record names, or `model`. `drop-in`: `target` is a folder, and gets each erased encoder whole as the file
    ComfyUI and Forge load (clip_l.safetensors, t5xxl_fp16.safetensors, ...)."""
    from .writers.atomic import check_target, staged_file

    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if rank is not None and rank < 1:
        raise BadInput(f"--rank must be at least 1, got {rank}")
    if rank is not None and not fmt.startswith("lora"):
        raise BadInput(f"--rank sets a LoRA's rank; {fmt} is no LoRA: leave --rank out or export lora-kohya or lora-diffusers")
    output, target = Path(output), Path(target)
    if fmt == "drop-in":
        return _export_drop_in(output, target, overwrite)
    if not target.suffix.lower() == ".safetensors":
        raise BadInput(f"export file {target} must end in .safetensors")
    target = check_target(target, overwrite, inputs=(output,))
    patch = read_patch(output)
    if patch.kind != ERASE_OUTPUT:
        raise BadInput(f"{output} is already an exported patch; export from the `erase` output folder")
    base = base_tensors(patch, model)
    differences = {encoder: {name: erased.float() - base[encoder][name].float() for name, erased in tensors.items()}
                   for encoder, tensors in patch.tensors.items()}
    record = stable_part(patch.record)
    with staged_file(target, overwrite) as staging:
        if fmt == "delta":
            report = delta.write_delta(staging, differences, record)
        else:
            report = lora.write_lora(staging, fmt, patch, base, differences, rank, record, tokenizers_in(patch, model))
    if report.get("effect_error", 0.0) > lora.TOLERANCE:
        missed = f"the LoRA misses {report['effect_error']:.1%} of the erase's effect on the erased prompts' embeddings"
        full = report["rank"] >= report["full_rank"]  # no higher rank to raise to
        if report["biases"] == "left out":
            fix = (" (kohya's keys cannot carry the bias changes); export lora-diffusers or delta to keep them"
                   + ("" if full else ", or raise --rank"))
        else:
            fix = "; export delta to keep it all" if full else "; raise --rank"
        warnings.warn(missed + fix, EraseWarning, stacklevel=2)
    return ExportResult(target, report)


def tokenizers_in(patch, model: str | None) -> Path | None:
    """Where the base's tokenizers are, for a LoRA's check on SD 3.x / FLUX.1 (T5's is in no checkpoint): its
    diffusers folder, or the --config folder a single file was erased with."""
    if not patch.family.flow_matching:
        return None
    path, where = base_path(patch, model)
    folder = path if path.is_dir() else patch.record["base"].get("config")
    if folder is None:
        raise BadInput(f"a LoRA of a {patch.family.label} erase is checked with the base's tokenizers, and {where} is a single "
                       "file erased without --config; pass --model with the model's diffusers folder")
    return Path(folder)


def _export_drop_in(output: Path, target: Path, overwrite: bool) -> ExportResult:
    from .writers.atomic import check_target, staged_folder

    if target.suffix.lower() == ".safetensors":
        raise BadInput(f"--format drop-in writes a folder of files (clip_l.safetensors, ...), but {target} names one file; name a folder")
    target = check_target(target, overwrite, inputs=(output,), writes="folder")
    patch = read_patch(output)
    if patch.kind != ERASE_OUTPUT:
        raise BadInput(f"{output} is an exported patch; drop-in files are written from the `erase` output folder")
    with staged_folder(target, overwrite) as staging:
        report = drop_in.write_drop_in(staging, patch, stable_part(patch.record))
    return ExportResult(target, report)
