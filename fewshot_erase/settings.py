"""The frozen record of one erase run: every hyperparameter, passed down and written out as-is to erase.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .errors import BadInput
from .keys import encoder_choice_ok, trained_encoders

TRAIN_CHOICES = ("ffn", "ffn+last-attn", "all")
PRESERVE_WEIGHT = 1.0  # the retain term's weight when concepts to keep are named: the demo's, measured there
SEED_LIMIT = 2**63  # torch's generators take -2**63 to 2**64 - 1; this leaves room for the offsets the rounds add


def seed_problem(seed: int) -> str | None:
    """What is wrong with a seed, if anything."""
    return None if 0 <= seed < SEED_LIMIT else f"--seed must be between 0 and 2**63 - 1, got {seed}"


@dataclass(frozen=True)
class EraseSettings:
    """Defaults are the published method's (Fuchi & Takagi, BMVC 2024) for Stable Diffusion."""

    concept: str
    style: bool = False
    # None: the object or style template list (prompts.py), or the model's own (the demo ships its captions).
    templates: Optional[tuple[str, ...]] = None
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-8
    batch_size: int = 2
    epochs: int = 4
    # None: epochs over the images, ceil(images / batch_size) steps each.
    steps: Optional[int] = None
    # None: the model's own resolution (the UNet's sample size times the VAE factor).
    resolution: Optional[int] = None
    seed: int = 0
    flip: bool = True
    train: str = "ffn"
    # None: the family's default (keys.trained_encoders); `all`, or a comma list of names or positions (`clip-l,t5`).
    encoder: Optional[str] = None
    # T5 blocks whose feed-forward weights train (None: every block); fewer cost less memory (docs/flow-models.md).
    t5_layers: Optional[tuple[int, ...]] = None
    # SD 3.x / FLUX.1: T5's tokens per caption, as the generator is run (None: the pipeline's default).
    max_sequence_length: Optional[int] = None
    device: str = "auto"
    # CPU threads for torch (None: torch's own choice); the weights are byte-identical only for the same count.
    threads: Optional[int] = None
    dtype: str = "auto"
    # Recompute the UNet's activations in the backward pass instead of keeping them: slower, far less GPU memory.
    low_memory: bool = False
    # Preservation: other concepts whose conditioning must not drift (filled into the same templates).
    preserve: tuple[str, ...] = ()
    preserve_weight: float = 0.0
    preserve_batch: int = 12  # kept concepts per step: the demo's nine, SD's 12 nearest, all every step
    # Steering: the concept's captions should generate this instead (None: the published pure ascent).
    anchor: Optional[str] = None
    # Stopping on evidence (stopping.py): every `until_window` steps once the published schedule is done, on fixed
    # noise; a concept found done leaves the rotation, and the run stops once none is left and no kept caption of
    # the last window drifted more than `until_drift` (until then it takes retain-only repair steps). steps is the
    # cap. Why these values: docs/stopping-rule.md.
    until: Optional[str] = None
    until_window: int = 4
    until_drift: float = 0.02
    # Rounds of the audit's soft-prompt attack after the erase, each attack's captions erased too (hardening.py).
    robust: bool = False

    def __post_init__(self):
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a finite positive number, got {self.lr}"),
            (seed_problem(self.seed) is None, seed_problem(self.seed)),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.resolution is None or self.resolution >= 8, f"--resolution must be at least 8, got {self.resolution}"),
            (self.train in TRAIN_CHOICES, f"--train must be one of {', '.join(TRAIN_CHOICES)}, got {self.train!r}"),
            (encoder_choice_ok(self.encoder), f"--encoder takes all, or names or positions such as clip-l,t5 or 1,2; got {self.encoder!r}"),
            (self.t5_layers is None or (len(self.t5_layers) > 0 and min(self.t5_layers) >= 0),
             f"--t5-layers must name blocks 0 and up, got {self.t5_layers}"),
            (self.max_sequence_length is None or self.max_sequence_length >= 1,
             f"--max-sequence-length must be at least 1, got {self.max_sequence_length}"),
            (math.isfinite(self.preserve_weight) and self.preserve_weight >= 0,
             f"--preserve-weight must be a finite number, zero or more, got {self.preserve_weight}"),
            (all(" ".join(text.split()) for text in self.preserve),
             "the concept to preserve is empty; name a concept, or leave the option out"),
            (self.until in (None, "gone"), f"--until must be 'gone', got {self.until!r}"),
            (self.until_window >= 1, f"the --until window must be at least 1, got {self.until_window}"),
            (self.until_drift >= 0, f"the --until drift bound must be zero or positive, got {self.until_drift}"),
            (self.preserve_batch >= 1, f"the preserve batch must be at least 1, got {self.preserve_batch}"),
            (self.dtype in ("auto", "float32", "float16", "bfloat16"),
             f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)

    def step_count(self, image_count: int) -> int:
        if self.steps is not None:
            return self.steps
        return -(-image_count // self.batch_size) * self.epochs

    def replace(self, **changes) -> "EraseSettings":
        return dataclasses.replace(self, **changes)

    def to_record(self) -> dict:
        record = dataclasses.asdict(self)
        record["betas"] = list(self.betas)
        record["templates"] = list(self.templates) if self.templates is not None else None
        record["preserve"] = list(self.preserve)
        record["t5_layers"] = list(self.t5_layers) if self.t5_layers is not None else None
        return record


def parse_layers(text: str) -> tuple[int, ...]:
    """`0-5`, `0,2,4` or both mixed, as --t5-layers takes them."""
    blocks: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            blocks.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise BadInput(f"--t5-layers takes block numbers and ranges such as 0-5 or 0,2,4, got {text!r}") from None
    if not blocks:
        raise BadInput(f"--t5-layers names no block in {text!r}; give e.g. 0-5")
    return tuple(sorted(blocks))


def with_implied(chosen: dict, recommended: dict) -> dict:
    """The caller's choices with what they imply: naming concepts to keep asks for a retain term, where neither the
    caller nor the model set its weight."""
    if chosen.get("preserve") and "preserve_weight" not in chosen and not recommended.get("preserve_weight"):
        return {**chosen, "preserve_weight": PRESERVE_WEIGHT}
    return chosen


def check_family_settings(family, settings: EraseSettings) -> None:
    """Choices that only some families have, refused where the model lacks them (before any work)."""
    chosen = [family.kinds[name] for name in trained_encoders(family, settings.encoder)]
    if "t5" not in family.encoder_names and (settings.t5_layers is not None or settings.max_sequence_length is not None):
        raise BadInput(f"--t5-layers and --max-sequence-length are T5's, and {family.label} has no T5; leave them out")
    if settings.t5_layers is not None and "t5" not in chosen:
        raise BadInput(f"--t5-layers names T5 blocks, but --encoder {settings.encoder} does not erase in T5; add t5 to --encoder or leave --t5-layers out")
    if settings.robust and "t5" in family.encoder_names:
        raise BadInput(f"--robust attacks with learned CLIP token embeddings, and {family.label} also reads T5, whose vocabulary "
                       "they do not reach; leave --robust out (audit's prompts attack still checks the erase)")
