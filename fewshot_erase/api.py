"""The Python API: `erase(...)` does what `fewshot-erase erase` does and returns an `EraseResult`.

Order matters for the user: everything that can be checked cheaply (concept, output path, pictures, model path) is
checked before the model is loaded, and nothing is written until the very end, into a staging folder.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import images as image_io
from . import prompts
from .concepts import COMMON_CONCEPTS, ConceptSpec, automatic_preserve, check_specs, nearest, one_or_many
from .errors import BadInput, EraseWarning, RunFailure, python_terms
from .families import FLUX
from .models import (PICKLE_SUFFIXES, KeptModel, import_libraries, load_pipeline_parts, resolve_device,
                     resolve_model)
from .base import base_identity
from .placement import encoders_held
from .record import RECORD_FORMAT, library_versions
from .settings import EraseSettings, check_family_settings, with_implied
from .writers.atomic import check_target, staged_folder
from .writers.text_encoder import write_erase_output

PRESERVE_NEIGHBOURS = 12


class Progress:
    """What the API reports while it works; the CLI renders it with rich. The default reports nothing."""

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None):
        """`advance(count=1, note=None, **figures)` as the phase goes: a count done, a line to show, figures."""
        yield lambda count=1, note=None, **info: None


@dataclass(frozen=True)
class EraseResult:
    output: Path
    record: dict

    @property
    def losses(self) -> list[float]:
        return self.record["losses"]

    @property
    def timings(self) -> dict:
        return self.record["timings"]

    def summary(self) -> dict:
        return {
            "output": str(self.output),
            "concept": self.record["concept"],
            "model": self.record["base"]["model"],
            "family": self.record["base"]["family"],
            "steps": self.record["steps"],
            "repair_steps": self.record.get("repair_steps", 0),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            "timings": self.timings,
            "effects": self.record["effects"],
            **({"robust_rounds": self.record["robust_rounds"]} if "robust_rounds" in self.record else {}),
        }


@contextlib.contextmanager
def out_of_memory_explained(settings: EraseSettings):
    """A GPU out of memory is the run's failure, with the ways out; the run has written nothing yet."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise RunFailure(out_of_memory_message(settings)) from None


def out_of_memory_message(settings: EraseSettings) -> str:
    ways = "a smaller" if settings.low_memory else "--low-memory, a smaller"
    return (f"the GPU ran out of memory{' even with --low-memory' if settings.low_memory else ''}; pass {ways} "
            f"--batch-size (now {settings.batch_size}) or a smaller --resolution (`fewshot-erase memory` estimates each)")


def _warn_long_captions(pipeline, templates, concept) -> None:
    tokenizer = pipeline.tokenizer
    longest = max(len(tokenizer(prompts.fill(t, concept)).input_ids) for t in templates)
    if longest > tokenizer.model_max_length:
        warnings.warn(
            f"captions with this concept are {longest} tokens, over CLIP's {tokenizer.model_max_length}; "
            "the end is cut off, as at generation time. A shorter concept name erases more precisely",
            EraseWarning, stacklevel=3,
        )


@python_terms
def erase(concept: str, images: str | Path | Sequence[str | Path], output: str | Path, *, anchor: str | None = None,
          **options) -> EraseResult:
    """Erase `concept` from a Stable Diffusion model's text encoder using a few real `images` of it (a folder, a
    picture, or a list of them).

    `options` are `erase_concepts`'s keywords and EraseSettings fields (lr, steps, batch_size, seed, resolution,
    templates, style, train, encoder, device, dtype, preserve, preserve_weight, until, ...)."""
    spec = ConceptSpec(concept, one_or_many(images), bool(options.get("style")), anchor)
    return erase_concepts([spec], output, **options)


@python_terms
def erase_concepts(
    specs: list[ConceptSpec],
    output: str | Path,
    *,
    model: str | None = None,
    overwrite: bool = False,
    config: str | None = None,
    allow_pickle: bool = False,
    auto_preserve: bool = True,
    progress: Progress | None = None,
    kept: KeptModel | None = None,
    **settings,
) -> EraseResult:
    """Erase one or several concepts into one patched encoder. Raises BadInput or RunFailure and then has
    written nothing. `kept`: reuse the model it holds when it is the same one (consecutive jobs of a batch)."""
    progress = progress or Progress()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    specs = check_specs(specs, tuple(settings.get("preserve", ())))
    source = resolve_model(model)
    if settings.get("templates") is not None:
        settings["templates"] = prompts.check_templates(settings["templates"])
    recommended = _recommended(source, len(specs))
    if settings.get("epochs") is not None and settings.get("steps") is not None:
        raise BadInput(f"--steps {settings['steps']} and --epochs {settings['epochs']} both set the run's length; give one")
    if "epochs" in settings:  # a schedule in epochs is the caller's choice of length: the model's steps give way
        recommended.pop("steps", None)
    settings = with_implied(settings, recommended)
    run_settings = EraseSettings(concept=", ".join(s.concept for s in specs), **{**recommended, **settings})
    check_output_is_a_folder(Path(output))
    if source.family is not None:
        check_family_settings(source.family, run_settings)  # now, before the pictures are read and the model loaded
    if run_settings.device != "auto":
        resolve_device(run_settings.device)  # a GPU asked for and absent fails now, not after the model has loaded
    image_paths = [image_io.find_image_files(spec.images) for spec in specs]
    inputs = tuple(Path(p) for spec in specs for p in spec.images) + ((source.path,) if source.path else ())
    target = check_target(Path(output), overwrite, inputs=inputs, writes="folder")
    with progress.phase("reading images", total=sum(map(len, image_paths))) as advance:
        loaded = []
        for paths in image_paths:
            loaded.append(image_io.once_each([image_io.load_image(path) for path in paths]))
            advance(len(paths))
    timings["images"] = time.perf_counter() - started

    clock = time.perf_counter()
    with progress.phase("loading model"):
        import_libraries()
        threads = use_threads(run_settings.threads)
        timings["import"] = time.perf_counter() - clock
        clock = time.perf_counter()
        parts = (kept.load if kept else load_pipeline_parts)(source, device=run_settings.device, dtype=run_settings.dtype,
                                                             config=config, allow_pickle=allow_pickle,
                                                             unet_on_host=run_settings.low_memory)
    timings["load"] = time.perf_counter() - clock
    check_family_settings(parts.family, run_settings)
    run_settings = run_settings.replace(resolution=run_settings.resolution or parts.resolution)
    if run_settings.resolution % parts.size_step:
        lower = max(parts.size_step, run_settings.resolution // parts.size_step * parts.size_step)
        raise BadInput(f"--resolution must be a multiple of {parts.size_step} for this model (as its pipeline "
                       f"generates), got {run_settings.resolution}; try {lower}")
    templates = {spec.concept: tuple(run_settings.templates or prompts.default_templates(spec.style or run_settings.style))
                 for spec in specs}
    clock = time.perf_counter()
    for spec in specs:
        _warn_long_captions(parts.pipeline, templates[spec.concept], spec.concept)
    # The concepts the report watches for interference: the preserve set, or the automatic one even when the bare
    # method runs (then it is only watched, not protected), so both ways of erasing can be compared.
    watched = run_settings.preserve
    if auto_preserve and "preserve" not in settings:
        watched = _automatic_preserve(parts, specs, source, run_settings)
        if run_settings.preserve_weight > 0:
            run_settings = run_settings.replace(preserve=watched)
    timings["prepare"] = time.perf_counter() - clock

    from . import unlearning as method

    clock = time.perf_counter()
    with progress.phase("encoding images", total=len(specs)) as advance, out_of_memory_explained(run_settings):
        targets = []
        for spec, pictures in zip(specs, loaded):
            pixels = image_io.to_pixels(pictures, run_settings.resolution, run_settings.flip)
            latents = method.encode_images_once(parts.pipeline.vae, pixels, parts.device, parts.dtype,
                                                packed=parts.family is FLUX)
            targets.append(method.Target(spec.concept, latents, len(pictures), templates[spec.concept], spec.anchor))
            advance()
    if parts.device.type != "cpu":
        parts.pipeline.vae.to(parts.host)  # not needed again: its GPU memory goes to the loop (docs/gpu-memory.md)
    timings["encode"] = time.perf_counter() - clock

    clock = time.perf_counter()
    base_hashes, base_fingerprints = base_identity(parts, run_settings)
    timings["identity"] = time.perf_counter() - clock
    run_settings, (before, result, effect) = _erase_fitting(parts, targets, watched, run_settings, progress, timings)

    all_images = [item for pictures in loaded for item in pictures]
    record = {
        "format": RECORD_FORMAT,
        "concept": run_settings.concept,
        "concepts": [
            {"concept": spec.concept, "style": spec.style or run_settings.style, "anchor": spec.anchor,
             "templates": list(templates[spec.concept]),
             "images": [{"name": item.path.name, "sha256": item.sha256} for item in pictures]}
            for spec, pictures in zip(specs, loaded)
        ],
        "style": run_settings.style,
        "images": [{"name": item.path.name, "sha256": item.sha256} for item in all_images],
        "images_paths": [str(item.path.absolute()) for item in all_images],  # an audit from elsewhere finds them
        "base": {
            "model": source.reference,
            "kind": source.kind,
            "family": parts.family.name,
            "text_encoders": base_hashes,
            "config": str(Path(config).absolute()) if config else None,  # a single file's configs and tokenizers
        },
        "base_fingerprints": base_fingerprints,
        "trained_tensors": {name: sorted(group) for name, group in result.trained.items()},
        "settings": run_settings.to_record(),
        "recommended_by_model": sorted(key for key in recommended if key not in settings),
        "steps": len(result.trajectory),
        "repair_steps": sum(1 for entry in result.trajectory if entry.get("repair")),
        "stopped_early": result.stopped_early,
        "losses": result.losses,
        "retain_losses": result.retain_losses,
        "trajectory": result.trajectory,
        **({"robust_rounds": result.rounds} if result.rounds is not None else {}),
        "effects": effect,
        "device": str(parts.device),
        "threads": threads,
        "dtype": str(parts.dtype).replace("torch.", ""),
        "versions": library_versions(),
    }
    clock = time.perf_counter()
    with progress.phase("saving", total=1) as advance:
        with staged_folder(target, overwrite) as staging:
            timings["save"] = 0.0
            record["timings"] = timings
            record["output"] = str(target)
            write_erase_output(staging, parts.pipeline, parts.family, record)
            timings["save"] = time.perf_counter() - clock
            timings["total"] = time.perf_counter() - started
            _rewrite_timings(staging, record)
            advance()
    return EraseResult(output=target, record=record)


def _erase_fitting(parts, targets, watched, run_settings, progress, timings):
    """The erase between the report's snapshots; where the GPU runs out of memory for it, once more from the same
    start with --low-memory (docs/gpu-memory.md), and the settings the erase ran with."""
    import torch

    from .unlearning import prepare_encoders

    trained = [p for group in prepare_encoders(parts, run_settings).values() for p in group.values()]
    start = {} if run_settings.low_memory else {p: p.detach().to(parts.host, copy=True) for p in trained}
    try:
        with encoders_held(parts, run_settings.low_memory):
            parts.denoiser.to(parts.device)  # with --low-memory it waited on the host until the encoders shrank
            return run_settings, _erase_between_snapshots(parts, targets, watched, run_settings, progress, timings)
    except torch.OutOfMemoryError:
        if run_settings.low_memory:
            raise RunFailure(out_of_memory_message(run_settings)) from None
    for parameter, original in start.items():
        parameter.data.copy_(original)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    low = run_settings.replace(low_memory=True)
    with encoders_held(parts, True), out_of_memory_explained(low):
        done = _erase_between_snapshots(parts, targets, watched, low, progress, timings)
    # said once it has worked: a run that fails anyway ends on its one error line
    warnings.warn("the GPU ran out of memory for the default erase, so it ran again with --low-memory from the start "
                  "(slower; the same update, the forward in the compute dtype)", EraseWarning, stacklevel=3)
    return low, done


def _erase_between_snapshots(parts, targets, watched, run_settings, progress, timings):
    """The report's snapshot before, the loop, the snapshot after: what the erase did, measured by one encoder."""
    from . import effects, hardening, unlearning

    method = hardening if run_settings.robust else unlearning

    clock = time.perf_counter()
    before = effects.snapshot(parts, targets, watched, run_settings)
    timings["report"] = time.perf_counter() - clock
    steps = run_settings.steps or sum(run_settings.step_count(t.image_count) for t in targets)
    clock = time.perf_counter()
    with progress.phase("erasing", total=steps) as advance:
        def attacking(round_number, concept, step):  # --robust's attacks take no erase step: the bar says so
            advance(0, note=f"round {round_number}: attacking {concept!r}, step {step}/{hardening.ATTACK_STEPS}")

        hooks = {"on_attack": attacking} if run_settings.robust else {}
        result = method.run(parts, targets, run_settings, before, lambda step, loss: advance(loss=loss), **hooks)
        unlearning.check_finite(result.trained, run_settings)
        if result.stopped_early:
            advance(0, note="stopped early: every concept done")
    timings["train"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with progress.phase("measuring the effect"):
        after = effects.snapshot(parts, targets, watched, run_settings, before.empty, before.blank)
        effect = effects.report(before, after, targets, result.trajectory)
    if not all(math.isfinite(e["advantage_after"]) for e in effect["erased"].values()):
        # weights that stayed finite can still overflow in the forward: the report's reading shows it
        raise RunFailure(f"the erased encoder's conditioning became inf or nan; lower --lr (now {run_settings.lr}) "
                         "or use --dtype float32")
    timings["report"] += time.perf_counter() - clock
    return before, result, effect


def check_output_is_a_folder(output: Path) -> None:
    if output.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        raise BadInput(f"output {output} names a {output.suffix} file, but an erase writes a folder (the text encoder "
                       "and erase.json); name a folder, then `fewshot-erase apply` writes the erase into a checkpoint file")


def use_threads(count: int | None) -> int:
    """torch's CPU threads for this process (the count is global to it); how many the run computes with."""
    import torch

    if count is not None:
        torch.set_num_threads(count)
    return torch.get_num_threads()


def _automatic_preserve(parts, specs, source, settings) -> tuple[str, ...]:
    """The demo keeps its other digits; a Stable Diffusion model keeps the common concepts nearest to the erased
    ones by the original encoder's pooled embedding (those are the ones an erase drags along)."""
    erased = [spec.concept for spec in specs]
    if source.kind == "demo":
        return automatic_preserve(erased, tuple(source.concepts))
    candidates = automatic_preserve(erased, COMMON_CONCEPTS)
    scores = concept_similarity(parts, erased, candidates)
    return nearest(scores, PRESERVE_NEIGHBOURS)


def concept_similarity(parts, erased: list[str], candidates: tuple[str, ...]) -> dict[str, float]:
    import torch

    from .conditioning import token_ids

    pipeline = parts.pipeline

    @torch.no_grad()
    def embed(words):
        ids, _ = token_ids(pipeline.tokenizer, [prompts.fill("a photo of a {}", w) for w in words])
        output = pipeline.text_encoder(ids.to(parts.device))  # CLIP-L in every family; SD 3.x's has a projection
        pooled = getattr(output, "pooler_output", None)
        pooled = (output.text_embeds if pooled is None else pooled).float()
        return torch.nn.functional.normalize(pooled, dim=-1)

    similarity = embed(list(candidates)) @ embed(erased).T
    return dict(zip(candidates, similarity.max(dim=1).values.tolist()))


def _recommended(source, concept_count: int) -> dict:
    """Erase settings a model ships with (the demo: its own captions and a learning rate that moves a small
    encoder); applied only where the caller did not choose. Lists in JSON become tuples here. A recommended step
    count is per concept: concepts take turns, so each gets as many steps as it would alone (an explicit --steps
    is the whole run's)."""
    recommended = {key: tuple(value) if isinstance(value, list) else value for key, value in source.recommended.items()}
    if recommended.get("steps"):
        recommended["steps"] *= concept_count
    return recommended


def _rewrite_timings(staging: Path, record: dict) -> None:
    """erase.json again, with the save and total times, while still in the staging folder: once the folder is
    renamed into place nothing more is written, so an interrupt can never leave a half-finished output."""
    import json

    (staging / "erase.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
