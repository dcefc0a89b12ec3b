"""The base a patch belongs to. At erase time: each original encoder's hash, and fingerprints of each tensor the
erase trains, in fp32, fp16 and bf16. At apply and export time: a model is compared in the dtype it stores, so an
fp16 file of the model erased in fp32 is the same base."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint_layouts as layouts
from . import families, safetensors_file
from .errors import BadInput
from .keys import encoder_kind, is_trained, trained_blocks, trained_encoders
from .model_files import WeightFile, model_files
from .patch import Patch
from .record import tensors_sha256
from .settings import EraseSettings
from .writers.text_encoder import canonical_state

FINGERPRINT_DTYPES = ("float32", "float16", "bfloat16")
SHOWN = 3  # differing tensors named in an error; the count says how many more


def fingerprints(tensors: dict) -> dict:
    """Hashes of each original tensor as fp32, fp16 and bf16: `apply` recognises the base in whatever dtype a
    checkpoint stores it (an fp16 file of the model erased in fp32 is the same base)."""
    import torch

    return {
        name: {dtype: tensors_sha256({"t": tensor.detach().to(getattr(torch, dtype))}) for dtype in FINGERPRINT_DTYPES}
        for name, tensor in tensors.items()
    }


def base_identity(parts, settings: EraseSettings) -> tuple[dict, dict]:
    """Before training changes them in place: each encoder's hash, and fingerprints of the tensors it will train."""
    hashes, prints = {}, {}
    for name in parts.family.encoders:
        encoder = parts.text_encoder(name)
        state = canonical_state(encoder)
        hashes[name] = {"sha256": tensors_sha256(state)}
        if name in trained_encoders(parts.family, settings.encoder):
            layers = encoder.config.num_hidden_layers
            blocks = trained_blocks(encoder_kind(encoder), settings.t5_layers)
            prints[name] = fingerprints({key: t for key, t in state.items() if is_trained(key, settings.train, layers, blocks)})
    return hashes, prints


def check_family(patch: Patch, family: families.Family, where: str) -> None:
    if family is not patch.family:
        raise BadInput(f"patch {patch.source} was made on an {patch.family.label} model but {where} is {family.label}; use the model it was erased from ({patch.record['base']['model']})")


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


def base_path(patch: Patch, model: str | None) -> tuple[Path, str]:
    """Where the base model is on disk (a Hub id's cached snapshot), and how to name it in a message."""
    from .models import download_from_hub, resolve_model

    reference = model or patch.record["base"]["model"]
    source = resolve_model(None if model is None and patch.record["base"]["kind"] == "demo" else reference)
    if source.kind == "pickle":
        raise BadInput(f"the base model {reference} is a pickle checkpoint; pass --model with a .safetensors copy of it")
    return (download_from_hub(reference) if source.kind == "hub" else source.path), f"base model {source.description}"


def base_tensors(patch: Patch, model: str | None) -> dict:
    """The base model's originals of the tensors the patch changes, checked against the erase's fingerprints."""
    path, where = base_path(patch, model)
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
