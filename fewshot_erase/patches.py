"""A patch: what an erase changed in a model's text encoder(s), read from an `erase` output folder or from a file
`export` wrote; where a model on disk keeps the tensors a patch changes; and the check that the model is the base the
patch was made from. `apply` and `export`, the Python API of the commands of the same names, close the module.

A base is recognised by the fingerprints the erase recorded of each tensor it trained, in fp32, fp16 and bf16: a
model is compared in the dtype it stores, so an fp16 file of the model erased in fp32 is the same base.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint_layouts as layouts
from . import families, safetensors_file
from .errors import BadInput, EraseWarning
from .record import stable_part, tensors_sha256
from .writers import delta, lora
from .writers.text_encoder import METADATA_KEY, WEIGHTS_NAME, encoder_folder

ERASE_OUTPUT = "erase output"
SHOWN = 3  # differing tensors named in an error; the count says how many more
TOLERANCE = 0.01  # the share of the erase's effect on the erased prompts' embeddings a LoRA may miss unwarned
# What `export` writes, and how `apply` reads each back into differences to add.
EXPORT_READERS = {"delta": delta.read_differences, **{flavour: lora.reader(flavour) for flavour in lora.FLAVOURS}}
EXPORT_FORMATS = tuple(EXPORT_READERS)


@dataclass(frozen=True)
class Patch:
    source: Path
    kind: str  # ERASE_OUTPUT, or the format `export` wrote: "delta", "lora-kohya", "lora-diffusers"
    record: dict
    family: families.Family
    tensors: dict  # encoder -> canonical name -> the erased tensor (an erase output) or the difference to add

    def patched(self, encoder: str, name: str, original):
        """What replaces `original` in a model: in its dtype, so an fp16 checkpoint stays fp16."""
        change = self.tensors[encoder][name]
        new = change if self.kind == ERASE_OUTPUT else original.float() + change.float()
        return new.to(original.dtype)

    @property
    def count(self) -> int:
        return sum(map(len, self.tensors.values()))


@dataclass(frozen=True)
class WeightFile:
    """One safetensors file of a model, and where it keeps each text encoder's feed-forward tensors."""

    path: Path
    header: dict
    keys: dict  # encoder -> canonical name -> the file's key
    layouts: dict  # encoder -> the label of the layout it is stored in

    def read(self, encoder: str, name: str):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(self.keys[encoder][name])

    def holds(self, encoder: str, name: str) -> bool:
        return name in self.keys.get(encoder, {})

    def dtype(self, encoder: str, name: str) -> str:
        return self.header[self.keys[encoder][name]]["dtype"]


def read_patch(path) -> Patch:
    path = Path(path)
    if path.is_dir():
        return _read_erase_output(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return _read_exported(path)
    raise BadInput(f"patch {path} is neither an `erase` output folder nor a .safetensors file `export` wrote; pass one of those")


def read_tensors(path: Path, wanted: dict[str, str]) -> dict:
    """`wanted` maps the names to return to the file's keys; the header is checked before anything is read."""
    from safetensors import safe_open

    present = set(safetensors_file.tensor_names(safetensors_file.read_header(path)))
    missing = sorted(set(wanted.values()) - present)
    if missing:
        raise BadInput(f"{path} lacks tensor {missing[0]!r} (and {len(missing) - 1} more); the file is damaged or incomplete, re-create it")
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(key) for name, key in wanted.items()}


def record_in(header: dict, where) -> dict | None:
    """The erase record a file carries in its metadata, None if it has none."""
    text = safetensors_file.metadata(header).get(METADATA_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
        record["base"]["family"], record["trained_tensors"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{where} has a damaged fewshot-erase record in its metadata; re-create the file") from None
    return record


def is_exported_patch(record: dict) -> bool:
    """A file `export` wrote; a model patched from one keeps its "export" entry, but beside "applied"."""
    return "export" in record and "applied" not in record


def _family(record: dict, where) -> families.Family:
    family = families.FAMILIES.get(record["base"]["family"])
    if family is None:
        raise BadInput(f"{where} was made on an unknown model family {record['base']['family']!r}; it was not written by this fewshot-erase")
    return family


def _check_feed_forward_only(record: dict, where) -> None:
    extra = [name for names in record["trained_tensors"].values() for name in names if not layouts.is_feed_forward(name)]
    if extra:
        raise BadInput(f"{where} also changed {extra[0]} (--train {record['settings']['train']}); patches carry feed-forward weights only: erase again with --train ffn")


def _check_patch_record(record: dict, where) -> None:
    """The fields a patch is read and applied by, with the types they need: a record that another tool rewrote
    carelessly, or that was made to mislead, gets one clear error instead of a crash further in."""
    base, trained, export = record.get("base"), record.get("trained_tensors"), record.get("export", {})
    sound = (isinstance(base, dict) and isinstance(base.get("family"), str) and isinstance(base.get("model"), str)
             and isinstance(trained, dict)
             and all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in trained.values())
             and isinstance(record.get("settings", {}), dict) and isinstance(record.get("base_fingerprints", {}), dict)
             and all(isinstance(prints, dict) for prints in record.get("base_fingerprints", {}).values())
             and isinstance(export, dict) and ("export" not in record or isinstance(export.get("format"), str)))
    if not sound:
        raise BadInput(f"{where} has a damaged fewshot-erase record; re-create it with fewshot-erase")


def _read_erase_output(folder: Path) -> Patch:
    from .outputs import read_record

    record = read_record(folder)
    _check_patch_record(record, folder)
    family = _family(record, folder)
    _check_feed_forward_only(record, folder)
    tensors = {
        encoder: read_tensors(encoder_folder(folder, family, encoder) / WEIGHTS_NAME, {name: name for name in names})
        for encoder, names in record["trained_tensors"].items() if names
    }
    return Patch(folder, ERASE_OUTPUT, record, family, tensors)


def _read_exported(path: Path) -> Patch:
    header = safetensors_file.read_header(path)
    record = record_in(header, path)
    if record is None:
        raise BadInput(f"{path} carries no fewshot-erase record; apply takes an `erase` output folder or a file `fewshot-erase export` wrote")
    _check_patch_record(record, path)
    kind = record["export"]["format"] if is_exported_patch(record) else None
    if kind not in EXPORT_READERS:
        raise BadInput(f"{path} is a model patched by fewshot-erase, not a patch; pass the `erase` output folder or a file `export` wrote")
    family = _family(record, path)
    tensors = read_tensors(path, {name: name for name in safetensors_file.tensor_names(header)})
    return Patch(path, kind, record, family, EXPORT_READERS[kind](tensors, record, family))


def model_files(path: Path, where: str) -> tuple[families.Family, list[WeightFile]]:
    """A single-file checkpoint or a diffusers pipeline folder: its family, and its files that hold text-encoder
    feed-forward tensors (a folder may hold several per encoder: shards, or variants such as model.fp16)."""
    from .models import family_of_folder

    if path.is_dir():
        family = family_of_folder(path, where)
        files = []
        for encoder in family.encoders:
            found = sorted((path / encoder).glob("*.safetensors"))
            if not found:
                raise BadInput(f"{path / encoder} holds no .safetensors weights (pickle .bin files are not patched); re-save the pipeline with safe_serialization=True")
            for file in found:
                header = safetensors_file.read_header(file)
                names = safetensors_file.tensor_names(header)
                layout = layouts.find_layout(layouts.PIPELINE_FOLDER_LAYOUTS, names, str(file))
                files.append(WeightFile(file, header, {encoder: layouts.feed_forward_keys(layout, names)},
                                        {encoder: layout.label}))
        return family, files
    header = safetensors_file.read_header(path)
    names = safetensors_file.tensor_names(header)
    family = families.family_from_keys(names, where)
    found = {encoder: layouts.find_layout(candidates, names, where)
             for encoder, candidates in layouts.SINGLE_FILE_LAYOUTS[family.name].items()}
    keys = {encoder: layouts.feed_forward_keys(layout, names) for encoder, layout in found.items()}
    return family, [WeightFile(path, header, keys, {encoder: layout.label for encoder, layout in found.items()})]


def check_family(patch: Patch, family: families.Family, where: str) -> None:
    if family is not patch.family:
        raise BadInput(f"patch {patch.source} was made on an {patch.family.label} model but {where} is {family.label}; apply it to the model it was erased from ({patch.record['base']['model']})")


def mismatches(patch: Patch, files: list[WeightFile], where: str) -> list[str]:
    """The patched tensors that `files` hold in another version than the patch's base, as `encoder:layer.module`.
    A tensor the model lacks, or holds in another shape, is an error that --force cannot override."""
    prints = patch.record.get("base_fingerprints", {})
    differing = []
    for encoder, tensors in patch.tensors.items():
        for name, change in tensors.items():
            copies = [file for file in files if file.holds(encoder, name)]
            if not copies:
                raise BadInput(f"{where} has no {encoder} tensor {name}; it is not the model the patch was made for ({patch.record['base']['model']})")
            for file in copies:
                original = file.read(encoder, name)
                if original.shape != change.shape:
                    raise BadInput(f"{where}: {encoder} {name} is {tuple(original.shape)}, the patch's is {tuple(change.shape)}; the patch is for another architecture")
                dtype = str(original.dtype).removeprefix("torch.")
                if prints.get(encoder, {}).get(name, {}).get(dtype) != tensors_sha256({"t": original}):
                    differing.append(f"{encoder}:{name.removeprefix(layouts.CANONICAL_LAYERS)}")
                    break
    return differing


def refuse_other_base(patch: Patch, differing: list[str], where: str, fix: str) -> None:
    if differing:
        shown = ", ".join(differing[:SHOWN]) + (f" and {len(differing) - SHOWN} more" if len(differing) > SHOWN else "")
        raise BadInput(f"{where} is not the base the patch was made from ({patch.record['base']['model']}): "
                       f"{len(differing)} of {patch.count} feed-forward tensors differ ({shown}); {fix}")


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
    pickled = checkpoint.is_file() and checkpoint.suffix.lower() in PICKLE_SUFFIXES
    if pickled and not allow_pickle:
        raise BadInput(f"{checkpoint} is a pickle checkpoint, which can run code when loaded; convert it to .safetensors or pass --allow-pickle")
    if checkpoint.is_file() and Path(output).suffix.lower() != ".safetensors":
        raise BadInput(f"output {output} must end in .safetensors: the patched checkpoint is written as safetensors")
    target = check_target(Path(output), overwrite, inputs=(checkpoint, Path(patch)))
    loaded = read_patch(patch)
    with tempfile.TemporaryDirectory(prefix="fewshot-erase-") as workdir:
        source = pickle_to_safetensors(checkpoint, Path(workdir)) if pickled else checkpoint
        family, files = model_files(source, str(checkpoint))
        check_family(loaded, family, str(checkpoint))
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


@dataclass(frozen=True)
class ExportResult:
    output: Path
    report: dict  # what `export` measured; also in the file's record under "export"

    def summary(self) -> dict:
        return {"output": str(self.output), **self.report}


def export(output, fmt: str, target, *, rank: int | None = None, model: str | None = None,
           overwrite: bool = False) -> ExportResult:
    """A small file of what the erase in `output` changed: its feed-forward differences (`delta`), or low-rank
    factors of them (`lora-kohya`, `lora-diffusers`). The differences need the base model's weights: the one the
    erase record names, or `model`."""
    from .writers.atomic import check_target, staged_file

    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if rank is not None and rank < 1:
        raise BadInput(f"--rank must be at least 1, got {rank}")
    output, target = Path(output), Path(target)
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
            report = lora.write_lora(staging, fmt, patch, base, differences, rank or lora.DEFAULT_RANK, record)
    if report.get("effect_error", 0.0) > TOLERANCE:
        missed = f"the LoRA misses {report['effect_error']:.1%} of the erase's effect on the erased prompts' embeddings"
        fix = (" (kohya's keys cannot carry the bias changes); export lora-diffusers or delta to keep them, or raise --rank"
               if report["biases"] == "left out" else "; raise --rank")
        warnings.warn(missed + fix, EraseWarning, stacklevel=2)
    return ExportResult(target, report)


def base_tensors(patch: Patch, model: str | None) -> dict:
    """The base model's originals of the tensors the patch changes, checked against the erase's fingerprints."""
    from .models import download_from_hub, resolve_model

    reference = model or patch.record["base"]["model"]
    source = resolve_model(None if model is None and patch.record["base"]["kind"] == "demo" else reference)
    if source.kind == "pickle":
        raise BadInput(f"the base model {reference} is a pickle checkpoint; pass --model with a .safetensors copy of it")
    path = download_from_hub(reference) if source.kind == "hub" else source.path
    where = f"base model {source.description}"
    family, files = model_files(path, where)
    check_family(patch, family, where)
    refuse_other_base(patch, mismatches(patch, files, where), where, "pass --model with the model the erase was made from")
    precise = {}
    for encoder, tensors in patch.tensors.items():
        for name in tensors:
            # A folder may hold fp32 and fp16 copies; the differences come from the most precise one.
            copies = [file for file in files if file.holds(encoder, name)]
            best = max(copies, key=lambda file: safetensors_file.DTYPE_BYTES[file.dtype(encoder, name)])
            precise.setdefault(encoder, {})[name] = best.read(encoder, name)
    return precise
