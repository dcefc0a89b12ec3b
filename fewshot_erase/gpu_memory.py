"""Will an erase fit on my GPU? The real erase path (encode the pictures, the report's snapshots, the loop with its
retain term, checks and optimizer, the save's copies) run on fake tensors, which carry shapes and no data: the
full-size SD 1.5, SD 2.1 and SDXL architectures, built from the packaged configs, take no memory and need no GPU.

Counted: the peak of live tensor bytes by kind (what `torch.cuda.max_memory_allocated` reports, each block rounded
up as the CUDA allocator does; not the allocator's cache or the CUDA context), and the FLOPs of each kind of step.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this many bytes
KINDS = ("weights", "gradients", "optimizer", "activations", "backward")


class PeakMemory(TorchDispatchMode):
    """Every tensor storage an operation creates is live from then until it is freed; the peak of their sum, and
    its split by kind at that moment: weights (what the modules held when tracking began), gradients (a trained
    weight's .grad), optimizer state, activations (made in a forward pass or outside autograd) and backward
    temporaries. Fake tensors carry no values: a reading of one (`.item()`) answers 1, or True for a boolean."""

    def __init__(self, modules, trained=(), device="cpu"):
        super().__init__()
        self.device = torch.device(device)  # the device that stands for the GPU: storages elsewhere are the host's
        self.owner: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # storage -> [kind, bytes]
        self.live = dict.fromkeys(KINDS, 0)
        self.peak, self.at_peak = 0, dict(self.live)
        self.clock = self.peak_clock = 0  # operations so far, and at the peak
        self.in_optimizer = False
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                self._add(tensor, "weights")
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p: self._relabel(p.grad, "gradients"))
                       for p in trained]
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks += [register_optimizer_step_pre_hook(lambda *_: setattr(self, "in_optimizer", True)),
                        register_optimizer_step_post_hook(lambda *_: setattr(self, "in_optimizer", False))]

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def release(self, module) -> None:
        """The module's weights left the GPU (the erase moves the VAE to the host once the pictures are encoded)."""
        for tensor in [*module.parameters(), *module.buffers()]:
            entry = self.owner.pop(tensor.untyped_storage(), None)
            if entry:
                self.live[entry[0]] -= entry[1]

    def arrive(self, module) -> None:
        """The module's weights came to the GPU (with --low-memory the UNet comes once the pictures are encoded)."""
        for tensor in [*module.parameters(), *module.buffers()]:
            self._add(tensor, "weights")

    def _add(self, tensor: torch.Tensor, kind: str) -> None:
        storage = tensor.untyped_storage()
        if tensor.device != self.device or storage in self.owner:
            return
        size = math.ceil(storage.nbytes() / BLOCK) * BLOCK
        entry = [kind, size, self.clock]
        self.owner[storage] = entry
        self.live[kind] += size
        weakref.finalize(storage, self._free, entry)

    def _free(self, entry) -> None:
        self.live[entry[0]] -= entry[1]
        entry[1] = 0

    def _relabel(self, tensor, kind: str) -> None:
        entry = self.owner.get(tensor.untyped_storage()) if tensor is not None else None
        if entry and entry[0] != kind:
            self.live[entry[0]] -= entry[1]
            self.live[kind] += entry[1]
            if kind == "weights" and entry[2] <= self.peak_clock:  # a weight then too: it was made before the peak
                self.at_peak[entry[0]] -= entry[1]
                self.at_peak[kind] += entry[1]
            entry[0] = kind

    def weights_recast(self, modules) -> None:
        """Weights given new storage while tracked (cast to another dtype) were counted as activations: relabel."""
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                self._relabel(tensor, "weights")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        if self.in_optimizer:
            kind = "optimizer"
        else:
            kind = "backward" if torch._C._current_graph_task_id() != -1 else "activations"
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, kind)
        self.clock += 1
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.at_peak, self.peak_clock = total, dict(self.live), self.clock
        return out


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float
    tflops: float  # dense fp16/bf16 tensor throughput with fp32 accumulation


# H100: NVIDIA's datasheet (BF16, dense); RTX 4090: the Ada whitepaper (FP16, FP32 accumulate, dense); RTX 3060 and
# RTX 4060: their generation's whitepaper rate per SM and clock times their SMs and boost clock.
CARDS = (Card("H100 SXM", 80, 989.4), Card("RTX 4090", 24, 165.2), Card("RTX 3060", 12, 25.4),
         Card("RTX 4060", 8, 30.2))
UTILISATION = 0.4  # the share of that peak a predicted time assumes: a guess until a GPU run measures it
CONTEXT_GIB = 0.5  # what the CUDA context and libraries take beside torch's tensors: "fits" leaves room for it


class Flops(TorchDispatchMode):
    """FLOPs of the matrix products, convolutions and attention run inside, by torch's own formulas. Not torch's
    FlopCounterMode: its per-module tracking keeps backward tensors alive under gradient checkpointing (measured:
    +0.4 GiB on SD 1.5's UNet), which the memory count beside it would then report."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


@contextmanager
def default_dtype(dtype):
    """Modules built inside get their weights in `dtype` (fake tensors cannot be cast after the fact)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def fake_pipeline(family, dtype, folder=None):
    """The family's full-size pipeline from the packaged configs (or `folder`'s), on fake tensors when built under
    fake mode (random weights otherwise): the UNet and VAE in `dtype`, the text encoders in fp32, as
    `load_pipeline_parts` leaves them."""
    import diffusers
    import transformers
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .models import CONFIGS_DIR, family_tokenizers

    folder = folder or CONFIGS_DIR / family.name
    index = diffusers.DiffusionPipeline.load_config(str(folder))
    with default_dtype(dtype):
        components = {name: getattr(diffusers, index[name][1]).from_config(getattr(diffusers, index[name][1]).load_config(str(folder / name)))
                      for name in (family.denoiser, "vae")}
    for name in family.encoders:
        cls = getattr(transformers, index[name][1])
        components[name] = cls(cls.config_class.from_json_file(str(folder / name / "config.json")))
    scheduler = getattr(diffusers, index["scheduler"][1])
    with unset_fake_temporarily():  # the flow-matching scheduler reads its own tensors' values when built
        components["scheduler"] = scheduler.from_config(scheduler.load_config(str(folder / "scheduler")))
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} if family.name in ("sd1", "sd2") else {}
    tokenizers = family_tokenizers(family) if not family.flow_matching else flow_tokenizers(family, components)
    return getattr(diffusers, family.pipeline_class)(**components, **tokenizers, **extra)


def flow_tokenizers(family, components) -> dict:
    """SD 3.x / FLUX.1 tokenizers for an estimate: the packaged CLIP one, and a stand-in for T5's (its sentencepiece
    model is not shipped): every caption is padded to the sequence length, so only the length counts."""
    from transformers import T5Tokenizer

    from .models import load_tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(ord("a"), ord("z") + 1)]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0)
    clips = {"tokenizer": load_tokenizer()}
    if family.name == "sd3":
        return {**clips, "tokenizer_2": load_tokenizer("!"), "tokenizer_3": t5}
    return {**clips, "tokenizer_2": t5}


# The settings an estimate runs with: what `erase` does on a Stable Diffusion model with no options, the bare
# published method, and the recipe with a retain term on 12 kept concepts and `--until gone`'s checks.
PRESETS = {
    "published": {"preserve_weight": 0.0},
    "default": {},
    "preserve": {"preserve_weight": 1.0, "until": "gone"},
}
WATCHED = 12  # the concepts the report watches (and the retain term keeps) on an SD model: api.PRESERVE_NEIGHBOURS
PICTURES = 6
STEPS = 2  # the first erase step has no retain term, the second has: every kind of step, and a check after it


@dataclass(frozen=True)
class Estimate:
    family: str
    resolution: int
    preset: str
    low_memory: bool
    dtype: str
    encoder: str | None
    t5_layers: tuple[int, ...] | None
    peak: int  # bytes
    at_peak: dict  # kind -> bytes at that moment
    encode_peak: int  # bytes, while the pictures are encoded (the VAE on the GPU)
    flops: dict  # "encode", "report" (before), "report_after", "first_step" (with the loop's set-up), "step",
    # "check", "floor": FLOPs of each
    schedule: int  # steps of the published schedule for PICTURES pictures
    until_window: int

    @property
    def loop_flops_per_step(self) -> float:
        """An erase step, and a check's share where the run checks (every `until_window` steps)."""
        return self.flops["step"] + (self.flops["check"] / self.until_window if self.flops["check"] else 0.0)

    @property
    def overhead(self) -> float:
        """Loop FLOPs over the floor's: the bare denoiser (UNet or transformer) forward and backward on the same
        pictures."""
        return self.loop_flops_per_step / self.flops["floor"]

    @property
    def total_flops(self) -> float:
        """The published schedule, the pictures' encoding and the report's two snapshots."""
        return (self.flops["encode"] + self.flops["report"] + self.flops["report_after"] + self.flops["first_step"]
                + (self.schedule - 1) * self.flops["step"] + self.flops["check"])

    def seconds_on(self, card: Card) -> float:
        return self.total_flops / (card.tflops * 1e12 * UTILISATION)


def estimate(family_name: str, resolution: int | None = None, preset: str = "default", low_memory: bool = False,
             dtype: str = "bfloat16", folder=None, encoder: str | None = None, t5_layers: tuple[int, ...] | None = None,
             sequence_length: int | None = None) -> Estimate:
    """One erase of PICTURES pictures on fake tensors, through the same functions `api.erase_concepts` calls;
    `folder`: another pipeline folder's configs (the demo's) instead of the family's packaged ones; `encoder`,
    `t5_layers`, `sequence_length`: erase's --encoder, --t5-layers and --max-sequence-length."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import effects, families, unlearning
    from .concepts import COMMON_CONCEPTS
    from .conditioning import conditioning
    from .denoising import noised, prediction_error
    from .models import ModelSource, PipelineParts, quiet_libraries
    from .placement import encoders_held
    from .prompts import default_templates
    from .settings import EraseSettings, check_family_settings
    from .writers.text_encoder import canonical_state

    quiet_libraries()
    family = families.FAMILIES[family_name]
    compute = getattr(torch, dtype)
    watched = () if preset == "published" else tuple(COMMON_CONCEPTS[:WATCHED])
    with FakeTensorMode(allow_non_fake_inputs=True):
        pipeline = fake_pipeline(family, compute, folder)
        parts = PipelineParts(pipeline, family, ModelSource("estimate", family_name, None), torch.device("cpu"),
                             compute, host="meta")
        options = {**PRESETS[preset], **({"preserve": watched} if PRESETS[preset].get("preserve_weight") else {})}
        settings = EraseSettings(concept="the concept", resolution=resolution or parts.resolution, steps=STEPS,
                                 low_memory=low_memory, encoder=encoder, t5_layers=t5_layers,
                                 max_sequence_length=sequence_length, **options)
        check_family_settings(family, settings)
        denoiser = parts.denoiser
        window = settings.until_window
        trained = unlearning.prepare_encoders(parts, settings)
        with torch.no_grad():  # the floor's conditioning: only its shape matters, and a gradient to flow into
            floor_cond = conditioning(pipeline, family, ["the concept"] * settings.batch_size, settings.resolution,
                                      compute, sequence_length=sequence_length)
        floor_cond["encoder_hidden_states"].requires_grad_(True)
        flops: dict[str, float] = {}
        with PeakMemory([denoiser, pipeline.vae, *(parts.text_encoder(n) for n in family.encoders)],
                        [p for group in trained.values() for p in group.values()]) as memory, Flops() as counter:
            def mark(name):
                flops[name] = counter.total - sum(flops.values())

            if low_memory:
                memory.release(denoiser)  # loaded to the host, it waits there while the pictures are encoded
            # the pictures are on the host; the encoder takes them to the GPU a few at a time
            pixels = torch.rand(2 * PICTURES, 3, settings.resolution, settings.resolution, device=parts.host) * 2 - 1
            latents = unlearning.encode_images_once(pipeline.vae, pixels, parts.device, compute,
                                                    packed=family is families.FLUX)
            mark("encode")
            encode_peak = memory.peak
            memory.release(pipeline.vae)  # the erase moves the VAE to the host once the pictures are encoded
            memory.peak = 0
            targets = [unlearning.Target("the concept", latents, PICTURES, default_templates(False))]
            encoders = [parts.text_encoder(name) for name in family.encoders]
            steps = []

            def on_step(step, loss):
                steps.append(counter.total)
                memory.weights_recast(encoders)  # the loop holds their frozen parts in the compute dtype

            with encoders_held(parts, low_memory):
                memory.weights_recast(encoders)
                if low_memory:
                    memory.arrive(denoiser)  # once the encoders are held in the compute dtype
                before = effects.snapshot(parts, targets, watched, settings)
                mark("report")
                unlearning.run(parts, targets, settings.replace(until_window=STEPS), before, on_step=on_step)
                memory.weights_recast(encoders)  # and back in fp32 after it
                mark("loop")
                effects.snapshot(parts, targets, watched, settings, before.empty, before.blank)
                mark("report_after")
            flops["first_step"] = steps[0] - flops["encode"] - flops["report"]
            flops["step"] = steps[1] - steps[0]
            flops["check"] = flops.pop("loop") - flops["first_step"] - flops["step"]
            peak, at_peak = memory.peak, dict(memory.at_peak)
            for module in encoders:  # the save: copies to the host (here "meta" stands for it as a device), not counted
                canonical_state(module)
            noisy, timesteps, goal = noised(latents[: settings.batch_size], unlearning.training_scheduler(pipeline),
                                            torch.Generator().manual_seed(0))
            start = counter.total
            denoiser.disable_gradient_checkpointing()  # the floor is the plain forward and backward
            prediction_error(denoiser, noisy, timesteps, goal, floor_cond).backward()
            flops["floor"] = counter.total - start
    return Estimate(family_name, settings.resolution, preset, low_memory, dtype, encoder, t5_layers, peak, at_peak,
                    encode_peak, flops,
                    EraseSettings(concept="x").step_count(PICTURES), window)


def check_request(families_asked: list[str], resolution: int | None, preset: str, dtype: str) -> None:
    """Bad requests fail before anything is built."""
    from . import families
    from .errors import BadInput

    unknown = [name for name in families_asked if name not in families.FAMILIES]
    if unknown:
        raise BadInput(f"unknown family {unknown[0]!r}; use one of {', '.join(families.FAMILIES)}")
    if resolution is not None and (resolution < 64 or resolution % 64):
        raise BadInput(f"--resolution must be a multiple of 64 of at least 64 (the UNet halves the latents three times), got {resolution}")
    if preset not in PRESETS:
        raise BadInput(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise BadInput(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")


def report(result: Estimate) -> dict:
    """What `fewshot-erase memory --json` prints for one estimate: GiB, TFLOPs, and the predictions per card."""
    gib = 2 ** 30
    return {
        "family": result.family, "resolution": result.resolution, "preset": result.preset,
        "low_memory": result.low_memory, "dtype": result.dtype, "encoder": result.encoder,
        "t5_layers": list(result.t5_layers) if result.t5_layers else None,
        "peak_gib": result.peak / gib, "at_peak_gib": {kind: size / gib for kind, size in result.at_peak.items()},
        "encode_peak_gib": result.encode_peak / gib,
        "tflops": {name: value / 1e12 for name, value in result.flops.items()},
        "loop_over_floor": result.overhead, "published_schedule_steps": result.schedule,
        "predicted_seconds": {card.name: result.seconds_on(card) for card in CARDS},
        "fits": {card.name: result.peak / gib + CONTEXT_GIB <= card.memory_gib for card in CARDS},
        "context_gib_allowed": CONTEXT_GIB,
        "utilisation_assumed": UTILISATION,
    }
