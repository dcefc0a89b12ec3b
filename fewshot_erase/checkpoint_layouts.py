"""Where a model file keeps its text encoders' feed-forward tensors: the canonical CLIP names of `keys.py` <-> the
names in single-file checkpoints (the original CompVis / Stability layout that A1111 and ComfyUI read and write) and
in a diffusers pipeline's text-encoder files. Pure tables and functions.

Feed-forward weights map one to one in every layout (same shape, no transpose); only the names differ. OpenCLIP
(SD 2.x, SDXL's second encoder) calls fc1/fc2 `c_fc`/`c_proj` and its layers `resblocks`. An SD 2.x file holds one
block more than diffusers' encoder (SD 2.x conditions on the penultimate layer): the patch's layer N is block N, and
the last block, which no erase trains, is never touched. T5 (SD 3.x, FLUX.1) keeps transformers' names everywhere,
under `text_encoders.t5xxl.transformer.` in all-in-one files; their CLIPs under `text_encoders.clip_l|clip_g.transformer.`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import keys
from .errors import BadInput

CANONICAL_LAYERS = "text_model.encoder.layers."
T5_LAYERS = "encoder.block."
SAME_NAMES = {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
OPEN_CLIP_NAMES = {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
T5_NAMES = {f"layer.1.DenseReluDense.{name}": f"layer.1.DenseReluDense.{name}" for name in ("wi", "wi_0", "wi_1", "wo")}


@dataclass(frozen=True)
class EncoderLayout:
    label: str
    layers: str  # the file's name for the encoder's layers, up to the layer number
    modules: dict[str, str]  # canonical feed-forward module -> its name inside a layer in this layout
    canonical_layers: str = CANONICAL_LAYERS  # the canonical names' prefix up to the layer number (T5_LAYERS for T5)

    def file_key(self, canonical: str) -> str:
        layer, rest = canonical.removeprefix(self.canonical_layers).split(".", 1)
        module, param = rest.rsplit(".", 1)
        return f"{self.layers}{layer}.{self.modules[module]}.{param}"

    def canonical(self, file_key: str) -> str | None:
        """The canonical name of a feed-forward tensor of this layout, None for any other tensor."""
        if not file_key.startswith(self.layers):
            return None
        layer, _, rest = file_key[len(self.layers):].partition(".")
        module, _, param = rest.rpartition(".")
        canonical_module = {name: canonical for canonical, name in self.modules.items()}.get(module)
        if not layer.isdigit() or canonical_module is None or param not in ("weight", "bias"):
            return None
        return f"{self.canonical_layers}{layer}.{canonical_module}.{param}"


def _clip(label: str, prefix: str) -> EncoderLayout:
    return EncoderLayout(label, prefix + CANONICAL_LAYERS, SAME_NAMES)


def _t5(prefix: str) -> EncoderLayout:
    return EncoderLayout("T5 names", prefix + T5_LAYERS, T5_NAMES, T5_LAYERS)


ALL_IN_ONE_CLIP_L, ALL_IN_ONE_CLIP_G, ALL_IN_ONE_T5 = ("text_encoders.clip_l.transformer.",
                                                       "text_encoders.clip_g.transformer.", "text_encoders.t5xxl.transformer.")


# family -> text encoder -> the layouts its single files come in, the usual one first.
SINGLE_FILE_LAYOUTS = {
    "sd1": {"text_encoder": (
        EncoderLayout("transformers names", "cond_stage_model.transformer.text_model.encoder.layers.", SAME_NAMES),
        # Files saved with transformers before the `text_model` wrapper existed.
        EncoderLayout("transformers names without text_model", "cond_stage_model.transformer.encoder.layers.", SAME_NAMES),
    )},
    "sd2": {"text_encoder": (
        EncoderLayout("OpenCLIP names", "cond_stage_model.model.transformer.resblocks.", OPEN_CLIP_NAMES),
    )},
    "sdxl": {
        "text_encoder": (
            EncoderLayout("transformers names", "conditioner.embedders.0.transformer.text_model.encoder.layers.", SAME_NAMES),
        ),
        "text_encoder_2": (
            EncoderLayout("OpenCLIP names", "conditioner.embedders.1.model.transformer.resblocks.", OPEN_CLIP_NAMES),
        ),
    },
    # Stability's all-in-one sd3.5_*.safetensors, ComfyUI's all-in-one FLUX.1 files
    "sd3": {"text_encoder": (_clip("transformers names", ALL_IN_ONE_CLIP_L),),
            "text_encoder_2": (_clip("transformers names", ALL_IN_ONE_CLIP_G),),
            "text_encoder_3": (_t5(ALL_IN_ONE_T5),)},
    "flux": {"text_encoder": (_clip("transformers names", ALL_IN_ONE_CLIP_L),),
             "text_encoder_2": (_t5(ALL_IN_ONE_T5),)},
}

# A diffusers text-encoder file: canonical names, or transformers >= 5.6's own without `text_model.` (keys.py).
PIPELINE_FOLDER_LAYOUTS = (
    EncoderLayout("transformers names", CANONICAL_LAYERS, SAME_NAMES),
    EncoderLayout("transformers >= 5.6 names, without text_model", "encoder.layers.", SAME_NAMES),
    _t5(""),
)


def is_feed_forward(canonical: str) -> bool:
    where = keys.layer_of(canonical)
    return where is not None and where[1:] in keys.FFN_MODULES


def feed_forward_keys(layout: EncoderLayout, file_keys) -> dict[str, str]:
    """Canonical name -> the file's key, for every feed-forward tensor of `layout` in the file."""
    found = {}
    for key in file_keys:
        canonical = layout.canonical(key)
        if canonical is not None:
            found[canonical] = key
    return found


def find_layout(candidates: tuple[EncoderLayout, ...], file_keys, where: str) -> EncoderLayout:
    file_keys = list(file_keys)
    for layout in candidates:
        if feed_forward_keys(layout, file_keys):
            return layout
    expected = " or ".join(f"'{layout.layers}N.*'" for layout in candidates)
    raise BadInput(f"{where} has no text-encoder feed-forward tensors where expected ({expected}); it is not a layout fewshot-erase can patch")
