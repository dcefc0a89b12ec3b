"""Where a model on disk (a single-file checkpoint or a diffusers folder) keeps the text-encoder tensors a patch
changes, found from the files' headers alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import checkpoint_layouts as layouts
from . import families, safetensors_file
from .errors import BadInput


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


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def refuse_quantised(files: list[WeightFile], encoders, what: str, fix: str, allowed=FLOAT_DTYPES) -> None:
    """Feed-forward tensors in a quantised dtype (fp8 T5 files are common): an erase's changes are smaller than fp8's
    steps, so a patch cannot be written into one faithfully; integer-quantised ones cannot even be trained."""
    for file in files:
        for encoder in encoders:
            for name in file.keys.get(encoder, {}):
                if file.dtype(encoder, name) not in allowed:
                    raise BadInput(f"{file.path}: {encoder}'s {name} is stored as {file.dtype(encoder, name)}, which {what}; {fix}")


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
