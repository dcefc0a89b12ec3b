"""Finding and loading the Stable Diffusion pipeline to erase from: the embedded demo, a diffusers folder, a Hub id
(cached the way diffusers does; HF_HUB_OFFLINE honoured) or a single-file checkpoint.

Only the parts erasing needs are loaded: no safety checker, no feature extractor.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import families, keys, safetensors_file
from .errors import BadInput, RunFailure, first_line

PACKAGE = Path(__file__).resolve().parent
DEMO_DIR = PACKAGE / "demo"
CONFIGS_DIR = PACKAGE / "configs"
TOKENIZER_DIR = DEMO_DIR / "tokenizer"  # the real CLIP tokenizer: the demo ships it, single files of every family use it
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "demo" | "folder" | "hub" | "single-file" | "pickle"
    reference: str  # what the user gave (or "demo")
    path: Path | None  # the local folder or file, once known
    recommended: dict = field(default_factory=dict)  # erase settings the model ships with (the demo does)
    generation: dict = field(default_factory=dict)  # guidance scale and steps it was measured to generate well at
    concepts: tuple[str, ...] = ()  # what the model knows, where it says so (the demo's digits)
    family: families.Family | None = None  # known before loading for a model on disk (a Hub id's once fetched)

    @property
    def description(self) -> str:
        return "the embedded demo model" if self.kind == "demo" else self.reference


def demo_metadata() -> dict:
    return json.loads((DEMO_DIR / "demo.json").read_text())


def resolve_model(model: str | None) -> ModelSource:
    """What the user's --model names, checked before anything heavy is imported."""
    if model is None:
        if not (DEMO_DIR / "model_index.json").is_file():
            raise RunFailure(f"the embedded demo model is missing from {DEMO_DIR}; reinstall fewshot-erase or pass --model")
        shipped = demo_metadata()
        generation = {key: shipped[key] for key in ("guidance_scale", "num_inference_steps") if key in shipped}
        return ModelSource("demo", "demo", DEMO_DIR, shipped.get("erase_settings", {}), generation,
                           tuple(shipped.get("concepts", ())), family_of_folder(DEMO_DIR, "the embedded demo model"))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BadInput(f"{path} is not a diffusers pipeline folder (no model_index.json); pass a pipeline folder, a Hub id or a .safetensors checkpoint")
        return ModelSource("folder", model, path, family=family_of_folder(path, model))  # fails now, before any work
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return ModelSource("single-file", model, path, family=single_file_family(path, model))  # fails now
        if suffix in PICKLE_SUFFIXES:
            return ModelSource("pickle", model, path)
        raise BadInput(f"{path} is not a model this tool reads; pass a diffusers folder, a Hub id or a .safetensors checkpoint")
    if HUB_ID.match(model) and not model.startswith("."):
        return ModelSource("hub", model, None)
    raise BadInput(f"model {model!r} does not exist; pass a diffusers folder, a .safetensors file or a Hub id like org/name")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{what} {path} cannot be read ({error}); the pipeline folder is damaged") from None


def family_of_folder(path: Path, where: str) -> families.Family:
    if not (path / "model_index.json").is_file():
        what = "an erase output, not a model" if (path / "erase.json").is_file() else "not a diffusers pipeline folder (no model_index.json)"
        raise BadInput(f"{where} is {what}; pass a .safetensors checkpoint or a diffusers pipeline folder")
    model_index = _read_json(path / "model_index.json", "model index")
    text_encoder = _read_json(path / "text_encoder" / "config.json", "text encoder config") or None
    return families.family_from_configs(model_index, text_encoder, where)


def download_from_hub(repo_id: str) -> Path:
    """The Hub snapshot's local folder, through diffusers' own download (which honours HF_HUB_OFFLINE and the cache)."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id))
    except Exception as error:  # huggingface_hub raises many types here; all mean the same to the user
        import huggingface_hub.constants as hub

        if hub.HF_HUB_OFFLINE:
            raise BadInput(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once online or pass a local folder") from None
        raise BadInput(f"cannot fetch model {repo_id!r} from the Hugging Face Hub ({type(error).__name__}); check the id and your network") from None


@dataclass
class PipelineParts:
    """The loaded pipeline and what the erase needs to know about it."""

    pipeline: object
    family: families.Family
    source: ModelSource
    device: object
    dtype: object
    host: str = "cpu"  # where weights wait while off the GPU (the memory estimate's fake run says "meta")
    held: dict = field(default_factory=dict)  # weight -> its fp32 value on the host, while --low-memory holds it

    @property
    def resolution(self) -> int:
        """What the pipeline generates at by default (FLUX's transformer has no sample size: its pipeline's)."""
        pipeline = self.pipeline
        size = pipeline.unet.config.sample_size if self.family.denoiser == "unet" else (
            getattr(pipeline.transformer.config, "sample_size", None) or pipeline.default_sample_size)
        return int(size) * int(pipeline.vae_scale_factor)

    @property
    def size_step(self) -> int:
        """The sizes the pipeline itself generates at are multiples of this: the VAE's factor (a UNet meets odd
        latent sizes on its way up), times a transformer's patch (FLUX packs 2x2 in the pipeline)."""
        if self.family.denoiser == "unet":
            return int(self.pipeline.vae_scale_factor)
        return int(self.pipeline.vae_scale_factor) * max(2, int(getattr(self.denoiser.config, "patch_size", 1) or 1))

    @property
    def denoiser(self):
        return getattr(self.pipeline, self.family.denoiser)

    def text_encoder(self, name: str):
        return getattr(self.pipeline, name)


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise BadInput(f"unknown --device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise BadInput(f"unsupported --device {device!r}; use cpu, cuda, cuda:N or auto")
    return resolved


def resolve_dtype(dtype: str, device):
    """Frozen UNet and VAE in half precision on a GPU; the CPU computes in fp32 (and stays deterministic)."""
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **extra)


def family_tokenizers(family: families.Family) -> dict:
    """The packaged tokenizer in each of the family's tokenizer slots. SD 2.x and SDXL's second encoder use
    OpenCLIP's tokenizer, which pads with "!" rather than the end token."""
    tokenizers = {"tokenizer": load_tokenizer("!" if family is families.SD2 else None)}
    if family is families.SDXL:
        tokenizers["tokenizer_2"] = load_tokenizer("!")
    return tokenizers


def import_libraries() -> None:
    """Import what loading and erasing need, so that a caller can time the imports apart from the load."""
    quiet_libraries()  # first: transformers warns about missing optional backends while these imports run
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401

    from . import unlearning  # noqa: F401


COMPONENT_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors")  # what from_pretrained reads


def _loader_errors() -> tuple[type[BaseException], ...]:
    """What diffusers raises on a damaged or mismatched model (files missing, configs wrong, tensors short); all
    mean the model, not the tool, is at fault."""
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError)


def dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` in 2026 and warns on the old name; the releases before it reject
    the new one. The rename shipped with this message constant, so its presence tells which name to pass."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _no_safety_checker(family: families.Family) -> dict:
    """SD 1.x and 2.x pipelines would load a safety checker; the erase never generates, so it needs none."""
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} if family in (families.SD1, families.SD2) else {}


def _pipeline_class(family: families.Family):
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _load_folder(path: Path, family: families.Family, dtype):
    import torch

    # A damaged weight file gets the header check's precise message rather than the loader's.
    for weights in sorted(path.glob("*/*.safetensors")):
        if weights.name in COMPONENT_WEIGHTS:
            safetensors_file.read_header(weights)
    cls = _pipeline_class(family)
    extra = _no_safety_checker(family)
    # The trained encoders load straight in fp32: by way of bf16 every weight of theirs would lose precision.
    dtypes = {"default": dtype, **{name: torch.float32 for name in family.encoders}}
    try:
        return cls.from_pretrained(str(path), **{dtype_keyword(): dtypes}, **extra)
    except _loader_errors() as error:
        raise BadInput(f"pipeline folder {path} could not be loaded ({first_line(error)}); check that it is complete or re-download it") from None


def single_file_family(path: Path, where: str) -> families.Family:
    from .model_files import FP8_DTYPES, FLOAT_DTYPES, model_files, refuse_quantised

    family, files = model_files(path, where)
    refuse_quantised(files, family.encoders, "cannot be trained (only float weights can)",
                     "use a copy of the checkpoint with float text encoders (fp16, bf16 or fp32; fp8 is upcast)",
                     allowed=FLOAT_DTYPES + FP8_DTYPES)
    return family


def _load_single_file(path: Path, family: families.Family, config: Path | None, dtype):
    """diffusers' `from_single_file` would fetch the family's configs from the Hub; hand it the packaged ones
    (or the user's --config for a non-standard architecture) and the packaged tokenizer instead."""
    if family.flow_matching and not config:
        raise BadInput(f"{path} is a {family.label} single file, and T5's tokenizer is neither in it nor shippable with "
                       "fewshot-erase; pass --config with the model's diffusers folder (its Hub snapshot) or a folder of its configs and tokenizers")
    config_dir = Path(config) if config else CONFIGS_DIR / family.name
    if not (config_dir / "model_index.json").is_file():
        raise BadInput(f"config folder {config_dir} has no model_index.json; pass a folder laid out like a diffusers pipeline (configs only)")
    # SD 3.x and FLUX.1 take every tokenizer from --config (transformers 5's are not the classes diffusers looks for)
    tokenizers = {} if family.flow_matching else family_tokenizers(family)
    extra = _no_safety_checker(family)
    cls = _pipeline_class(family)
    try:
        if family is families.FLUX:  # diffusers' converter knows FLUX.1's width only (flux_checkpoint.py)
            from .flux_checkpoint import load_flux_transformer

            extra["transformer"] = load_flux_transformer(path, config_dir, dtype)
        pipeline = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                        **{dtype_keyword(): dtype}, **tokenizers, **extra)
        _tie_t5_embeddings(pipeline, family)
        return pipeline
    except _loader_errors() as error:
        if "size mismatch" in str(error) or "shape" in str(error):
            raise BadInput(f"{path}: tensor shapes do not match the {family.label} architecture; pass --config with the model's own configs") from None
        raise BadInput(f"{path} could not be read as a {family.label} checkpoint ({first_line(error)}); check the file") from None


def _tie_t5_embeddings(pipeline, family: families.Family) -> None:
    """diffusers' single-file loader fills T5 on the meta device and breaks its `embed_tokens` <-> `shared` tie; no
    file holds `embed_tokens` (it is `shared`), so it would stay on meta. Tie it again."""
    for name in family.encoders:
        encoder = getattr(pipeline, name)
        if keys.encoder_kind(encoder) == "t5" and encoder.encoder.embed_tokens.weight.is_meta:
            encoder.tie_weights()


def pickle_to_safetensors(path: Path, workdir: Path) -> Path:
    """Pickle checkpoints run code when unpickled; `weights_only=True` refuses anything but tensors and containers."""
    import warnings

    import torch
    from safetensors.torch import save_file

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols before it refuses them
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # a hostile or damaged pickle makes torch raise a dozen types; all mean the same here
        raise BadInput(f"{path} is damaged or holds more than plain tensors (objects that could run code when unpickled); it was not loaded. Use a .safetensors file") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BadInput(f"{path} holds no state dict of tensors; use a .safetensors checkpoint")
    target = workdir / (path.stem + ".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def load_pipeline_parts(source: ModelSource, *, device: str = "auto", dtype: str = "auto", config: str | None = None,
                        allow_pickle: bool = False, unet_on_host: bool = False) -> PipelineParts:
    """`unet_on_host`: leave the denoiser (UNet or transformer) on the host, for an erase to move it once the pictures
    are encoded (--low-memory: the VAE's activations and the denoiser's weights are never on the GPU together)."""
    import torch

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source.kind == "pickle" and not allow_pickle:
        raise BadInput(f"{source.path} is a pickle checkpoint, which can run code when loaded; convert it to .safetensors or pass --allow-pickle")
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="fewshot-erase-") as workdir:
        if source.kind in ("demo", "folder"):
            family = source.family or family_of_folder(source.path, source.description)
            pipeline = _load_folder(source.path, family, torch_dtype)
        elif source.kind == "hub":
            path = download_from_hub(source.reference)
            family = family_of_folder(path, source.reference)
            source = ModelSource("hub", source.reference, path, family=family)
            pipeline = _load_folder(path, family, torch_dtype)
        else:
            path = pickle_to_safetensors(source.path, Path(workdir)) if source.kind == "pickle" else source.path
            family = source.family or single_file_family(path, source.reference)  # a pickle's: once converted
            pipeline = _load_single_file(path, family, config, torch_dtype)
    pipeline.set_progress_bar_config(disable=True)
    # Trainable weights stay in fp32 whatever the frozen parts compute in.
    for name in family.encoders:
        getattr(pipeline, name).to(dtype=torch.float32)
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and not (unet_on_host and name == family.denoiser):
            component.to(torch_device)
    return PipelineParts(pipeline=pipeline, family=family, source=source, device=torch_device, dtype=torch_dtype)


class KeptModel:
    """The last pipeline loaded, kept for the next erase from the same model in this process (a batch worker). Its
    text encoders go back to their original weights, and the UNet to its plain forward, before it is lent again, so
    an erase from it is the same as one from a fresh load."""

    def __init__(self):
        self.key, self.parts, self.originals = None, None, {}

    def load(self, source: ModelSource, **options) -> PipelineParts:
        key = (source.kind, source.reference, str(source.path), tuple(sorted(options.items())))
        if key != self.key:
            self.key, self.parts, self.originals = None, None, {}  # the previous model goes before the next loads
            parts = load_pipeline_parts(source, **options)
            self.originals = {name: {key: tensor.detach().clone() for key, tensor in parts.text_encoder(name).state_dict().items()}
                              for name in parts.family.encoders}
            self.key, self.parts = key, parts
            return parts
        for name, state in self.originals.items():
            encoder = self.parts.text_encoder(name)
            encoder.load_state_dict(state)
            encoder.to(self.parts.device)  # a --low-memory erase leaves its encoders on the host
        if self.parts.denoiser.is_gradient_checkpointing:  # a --low-memory job before this one
            self.parts.denoiser.disable_gradient_checkpointing()
        if options.get("unet_on_host"):
            self.parts.denoiser.to("cpu")
        return self.parts
