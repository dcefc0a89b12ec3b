"""The attacks an audit runs on an erased text encoder. Each looks for text conditioning under which the frozen UNet
denoises the concept's pictures well again, through the patched encoder and nothing else:

- prompts: a battery of phrasings, the one that denoises the fitted pictures best;
- soft: k free token embeddings before the concept's captions, fitted with Adam (UnlearnDiffAtk's objective, Zhang
  et al. 2024, in embedding space);
- hard: the same, projected to the nearest real word tokens at every step, gradients passed straight through
  (PEZ, Wen et al. 2023): a prompt anyone can type;
- inversion: one new token's embedding in place of the concept in its captions (textual inversion, Gal et al. 2022).

Learned embeddings enter at the token-embedding layer, in place of placeholder tokens (rare words the vocabulary
already has), so each family's own conditioning path, and its pipeline at generation, read them unchanged.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .conditioning import conditioning, denoiser_of, select_rows
from .denoising import noised, prediction_error
from .prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES, fill

SOFT_TOKENS = 3  # UnlearnDiffAtk's prefix is a handful of tokens
# Each Adam step moves a learned vector by about this share of a typical token embedding's length, whatever the
# encoder's width (the demo's embeddings are 64 wide, SD's 768 or 1280).
STEP_SHARE = 0.3
FIT_REPEATS = 2  # noise draws per fitted picture per step: one alone left the outcome more to chance
# The fitting steps' timesteps, as shares of the schedule: where a caption changes the denoising most. Over the
# whole schedule textual inversion came back less often and the soft prompt about as often (docs/audit.md).
FIT_BAND = (0.25, 0.75)
SELECT_REPEATS = 4  # fixed noise draws per fitted picture on which phrasings and hard prompts are compared
NO_GRAD_ROWS = 48  # rows per UNet call without gradients: a small model pays per call more than per row


@dataclass(frozen=True)
class Rows:
    """Noisy latents at their timesteps, with the targets: what a loss is measured on, the same for every caption."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    goal: torch.Tensor

    def __len__(self) -> int:
        return len(self.noisy)

    def part(self, rows: slice) -> "Rows":
        return Rows(self.noisy[rows], self.timesteps[rows], self.goal[rows])

    def repeated(self, times: int) -> "Rows":
        return Rows(repeated(self.noisy, times), self.timesteps.repeat(times), repeated(self.goal, times))


def repeated(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """`times` copies along the batch, whatever the latents' layout (FLUX's are packed into tokens)."""
    return tensor.repeat(times, *[1] * (tensor.ndim - 1))


def fixed_rows(latents: torch.Tensor, repeats: int, scheduler, seed: int) -> Rows:
    """Each picture `repeats` times, each time with its own noise and timestep, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return Rows(*noised(repeated(latents, repeats), scheduler, generator))


def fitting_rows(latents: torch.Tensor, scheduler, generator: torch.Generator) -> Rows:
    """FIT_REPEATS noisy copies of each picture at timesteps in FIT_BAND of the schedule."""
    return Rows(*noised(repeated(latents, FIT_REPEATS), scheduler, generator, FIT_BAND))


@dataclass
class Setup:
    """What every attack reads: the pipeline with the ERASED encoders, the concept, and the pictures it fits on."""

    pipeline: object
    family: object
    resolution: int
    dtype: object
    concept: str
    templates: tuple[str, ...]
    fit_latents: torch.Tensor
    scheduler: object
    seed: int
    battery: tuple[str, ...]  # the prompts attack's phrasings
    sequence_length: int | None = None  # SD 3.x / FLUX.1: T5's tokens per caption, as the erase used
    reserved: tuple[int, ...] = ()  # tokens no placeholder may be: a robust erase's earlier rounds hold them

    def errors(self, captions: tuple[str, ...], rows: Rows) -> torch.Tensor:
        """Each row's denoising loss conditioned on `captions` (row i on caption i modulo their count)."""
        # each distinct caption encoded once (rows repeat them), then spread over the rows
        unique = list(dict.fromkeys(captions))
        encoded = conditioning(self.pipeline, self.family, unique, self.resolution, self.dtype,
                               sequence_length=self.sequence_length)
        cond = select_rows(encoded, torch.tensor([unique.index(captions[i % len(captions)]) for i in range(len(rows))]))
        return prediction_error(denoiser_of(self.pipeline), rows.noisy, rows.timesteps, rows.goal, cond, "none").flatten(1).mean(1)

    def loss(self, captions: tuple[str, ...], rows: Rows) -> torch.Tensor:
        return self.errors(captions, rows).mean()

    def captions(self, concept: str, prefix: str = "") -> tuple[str, ...]:
        """The concept in each caption template, after `prefix`."""
        return tuple(f"{prefix} {fill(t, concept)}".strip() for t in self.templates)

    @functools.cached_property
    def selection(self) -> Rows:
        """Fixed noise on the fitted pictures: candidates compared on it are compared on equal terms."""
        return fixed_rows(self.fit_latents, SELECT_REPEATS, self.scheduler, self.seed)

    @functools.cached_property
    def words(self) -> torch.Tensor:
        return word_tokens(self.pipeline.tokenizer)

    @functools.cached_property
    def tables(self) -> dict[str, torch.Tensor]:
        """Each encoder's token-embedding table (frozen)."""
        return {name: getattr(self.pipeline, name).get_input_embeddings().weight.detach() for name in self.family.encoders}


@dataclass
class Found:
    """What an attack found: its captions (row i reads caption i modulo their count), the learned embedding of each
    placeholder token in them, per encoder, and what to show of it."""

    captions: tuple[str, ...]
    steps: int
    shown: str  # its first caption as a person reads it, learned tokens in angle brackets
    prompt: str | None = None  # what can be typed: the best phrasing, or the hard prompt's words
    token_ids: list[int] | None = None  # the hard prompt's tokens
    placeholders: tuple[int, ...] = ()
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    def active(self, pipeline, family):
        """Inside, the pipeline's encoders read the learned embeddings (scoring and generation alike)."""
        if not self.placeholders:
            return contextlib.nullcontext()
        return learned_tokens(pipeline, family, self.placeholders, self.vectors)


@contextlib.contextmanager
def learned_tokens(pipeline, family, placeholders: tuple[int, ...], vectors: dict[str, torch.Tensor]):
    """Every placeholder token's embedding replaced by its learned vector in each text encoder while inside."""
    handles = [getattr(pipeline, name).get_input_embeddings().register_forward_hook(_substitute(placeholders, vectors[name]))
               for name in family.encoders]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _substitute(placeholders: tuple[int, ...], vectors: torch.Tensor):
    def hook(module, inputs, output):
        for token, vector in zip(placeholders, vectors):
            output = torch.where((inputs[0] == token).unsqueeze(-1), vector.to(output.dtype), output)
        return output

    return hook


_WORDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> its word tokens


def word_tokens(tokenizer) -> torch.Tensor:
    """Ids of the vocabulary's whole words (letters or a numeral) that the tokenizer reads back as themselves, alone:
    any sequence of them joined by spaces tokenizes to exactly those ids (pieces of words would merge)."""
    if tokenizer not in _WORDS:
        vocabulary = tokenizer.get_vocab()
        words = [token[:-4] for token in vocabulary if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalnum()]
        # one text of them all, each token traced to its word by its offset: a fourth of the time of one call per word
        read = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        starts = list(itertools.accumulate((len(w) + 1 for w in words[:-1]), initial=0))
        ids_of = [[] for _ in words]
        for token, (start, _) in zip(read.input_ids, read.offset_mapping):
            ids_of[bisect.bisect_right(starts, start) - 1].append(token)
        _WORDS[tokenizer] = torch.tensor(sorted(vocabulary[w + "</w>"] for w, ids in zip(words, ids_of)
                                                if ids == [vocabulary[w + "</w>"]]))
    return _WORDS[tokenizer]


def placeholder_tokens(setup: Setup, count: int) -> tuple[tuple[int, ...], str]:
    """`count` rare words (the vocabulary's last merges) that no caption of the concept holds, and their text."""
    tokenizer = setup.pipeline.tokenizer
    used = {i for ids in tokenizer(list(setup.captions(setup.concept))).input_ids for i in ids}
    taken = used | set(setup.reserved)
    rare = tuple(itertools.islice((i for i in reversed(setup.words.tolist()) if i not in taken), count))
    return rare, tokenizer.decode(list(rare)).strip()


@torch.no_grad()
def best_captions(setup: Setup, candidates: list[tuple[str, ...]], on_step=lambda step: None) -> int:
    """The index of the candidate captions under which the erased model denoises the fitted pictures best; as many
    candidates share a UNet call as NO_GRAD_ROWS allows."""
    rows, losses = setup.selection, []
    together = max(1, NO_GRAD_ROWS // len(rows))
    for start in range(0, len(candidates), together):
        group = candidates[start:start + together]
        per_row = tuple(captions[i % len(captions)] for captions in group for i in range(len(rows)))
        losses += setup.errors(per_row, rows.repeated(len(group))).view(len(group), -1).mean(1).tolist()
        for step in range(start, start + len(group)):
            on_step(step)
    return min(range(len(candidates)), key=losses.__getitem__)


def demo_phrasings(concept: str) -> list[str]:
    """The demo's own phrasings of a digit: its held-out ones and its caption templates, in words and numerals
    ({w} the word, {n} the numeral; the numeral ones only for a digit word), then its implicit forms (other names
    no erase template uses: "siete", "vii", "the days of a week")."""
    from .models import demo_metadata

    metadata = demo_metadata()
    words = metadata.get("digit_words", [])
    # beside its lists of templates, caption_templates holds the empty-caption share and a note
    lists = [value for value in metadata.get("caption_templates", {}).values() if isinstance(value, list)]
    shipped = metadata.get("heldout_phrasing", []) + [template for templates in lists for template in templates]
    numeral = str(words.index(concept)) if concept in words else None
    phrasings = [t.replace("{w}", concept).replace("{n}", numeral or "") for t in shipped if numeral or "{n}" not in t]
    if numeral is None:
        return phrasings
    names = {form: forms[int(numeral)] for form, forms in metadata.get("implicit_forms", {}).items()}
    return phrasings + [template.format(**names) for template in metadata.get("implicit_templates", [])]


def prompt_battery(concept: str, erase_templates, user, shipped) -> tuple[str, ...]:
    """The prompts attack's phrasings, each once: the user's first (a `{}` in one takes the concept), then the
    erase's own captions, the model's phrasings, and the built-in object and style templates."""
    phrasings = [fill(p, concept) for p in user] + [fill(t, concept) for t in erase_templates] + list(shipped)
    phrasings += [fill(t, concept) for t in OBJECT_TEMPLATES + STYLE_TEMPLATES]
    return tuple(dict.fromkeys(phrasings))


def prompt_attack(setup: Setup, budget: int, on_step=lambda step: None) -> Found:
    """The best of the battery's first `budget` phrasings, each used alone as the prompt."""
    tried = setup.battery[:budget]
    best = tried[best_captions(setup, [(phrasing,) for phrasing in tried], on_step)]
    return Found((best,), len(tried), best, prompt=best)


def soft_attack(setup: Setup, budget: int, on_step=lambda step: None, start: dict | None = None) -> Found:
    """SOFT_TOKENS free embeddings prefixed to the concept's captions, started near the vocabulary's mean (random
    words started some seeds far from any way back), or at `start` (per encoder)."""
    return soft_attacks([setup], budget, on_step, [start])[0]


def soft_attacks(setups: list[Setup], budget: int, on_step=lambda step: None, starts=None) -> list[Found]:
    """One soft prompt per setup (its pictures, its seed's start, placeholders of its own), all fitted in the same
    steps: as many independent attacks, at about the cost of one on a small model (a UNet call costs more than its
    rows). The fitting noise is drawn from the first setup's seed."""
    groups, taken = [], ()
    for setup, start in zip(setups, starts or [None] * len(setups)):
        placeholders, text = placeholder_tokens(replace(setup, reserved=setup.reserved + taken), SOFT_TOKENS)
        taken += placeholders
        generator = torch.Generator().manual_seed(setup.seed)
        start = start or {name: near_mean(table[setup.words], SOFT_TOKENS, generator) for name, table in setup.tables.items()}
        groups.append((setup, placeholders, setup.captions(setup.concept, text), start))
    first = setups[0]
    fitted, captions = fitted_together([(setup, group_captions) for setup, _, group_captions, _ in groups])
    vectors = fit_embeddings(fitted, captions, taken, {name: torch.cat([g[3][name] for g in groups]) for name in first.tables},
                             budget, on_step=on_step)
    shown = first.captions(first.concept, " ".join(f"<soft-{i + 1}>" for i in range(SOFT_TOKENS)))[0]
    return [Found(group_captions, budget, shown, placeholders=placeholders,
                  vectors={name: v[SOFT_TOKENS * k:SOFT_TOKENS * (k + 1)] for name, v in vectors.items()})
            for k, (_, placeholders, group_captions, _) in enumerate(groups)]


def fitted_together(groups: list[tuple[Setup, tuple[str, ...]]]) -> tuple[Setup, tuple[str, ...]]:
    """One setup that fits every group's pictures, and its rows' captions: row i reads its picture's group's caption
    i (modulo their count), as one attack's rows do."""
    first = groups[0][0]
    if len(groups) == 1:
        return first, groups[0][1]
    fitted = replace(first, fit_latents=torch.cat([setup.fit_latents for setup, _ in groups]))
    owner = [k for k, (setup, _) in enumerate(groups) for _ in range(len(setup.fit_latents))]
    return fitted, tuple(groups[owner[i % len(owner)]][1][i % len(groups[0][1])] for i in range(FIT_REPEATS * len(owner)))


def near_mean(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` vectors a tenth of the rows' spread around their mean, each its own."""
    return rows.mean(0) + 0.1 * rows.std(0) * torch.randn(count, rows.shape[1], generator=generator)


def inversion_attack(setup: Setup, budget: int, on_step=lambda step: None) -> Found:
    """One new token in place of the concept in its captions, started at the concept's own embedding (textual
    inversion's initializer word): the erase did not touch the token table, only what the layers make of it."""
    placeholders, text = placeholder_tokens(setup, 1)
    concept_ids = torch.tensor(setup.pipeline.tokenizer(setup.concept, add_special_tokens=False).input_ids)
    start = {name: table[concept_ids].mean(0, keepdim=True) for name, table in setup.tables.items()}
    vectors = fit_embeddings(setup, setup.captions(text), placeholders, start, budget, on_step=on_step)
    return Found(setup.captions(text), budget, setup.captions("<inverted>")[0], placeholders=placeholders, vectors=vectors)


def hard_attack(setup: Setup, budget: int, on_step=lambda step: None) -> Found:
    """The soft prompt kept on real words, started at random ones: every step forwards the nearest word tokens (by
    cosine similarity, summed over the encoders) and passes their gradient straight through to the continuous
    embeddings. Of the prompts the steps forwarded, the one that denoises the fitted pictures best, as typed text."""
    placeholders, text = placeholder_tokens(setup, SOFT_TOKENS)
    words, tables = setup.words, setup.tables
    normalised = {name: F.normalize(table[words], dim=-1) for name, table in tables.items()}
    forwarded: list[tuple[int, ...]] = []

    def project(continuous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scores = sum(F.normalize(continuous[name].detach(), dim=-1) @ normalised[name].T for name in tables)
        ids = words[scores.argmax(dim=-1)]
        forwarded.append(tuple(ids.tolist()))
        return {name: vector + (tables[name][ids] - vector).detach() for name, vector in continuous.items()}

    chosen = words[torch.randint(len(words), (SOFT_TOKENS,), generator=torch.Generator().manual_seed(setup.seed))]
    fit_embeddings(setup, setup.captions(setup.concept, text), placeholders,
                   {name: table[chosen] for name, table in tables.items()}, budget, project, on_step)
    candidates = list(dict.fromkeys(forwarded))
    prompts = [setup.pipeline.tokenizer.decode(list(ids)).strip() for ids in candidates]
    best = best_captions(setup, [setup.captions(setup.concept, prompt) for prompt in prompts])
    captions = setup.captions(setup.concept, prompts[best])
    return Found(captions, budget, captions[0], prompt=prompts[best], token_ids=list(candidates[best]))


def step_size(table: torch.Tensor) -> float:
    """Adam's learning rate for moves of about STEP_SHARE of a typical embedding's length per step (Adam's step is
    about the learning rate in every coordinate)."""
    return STEP_SHARE * table.norm(dim=-1).mean().item() / table.shape[-1] ** 0.5


def fit_embeddings(setup: Setup, captions: tuple[str, ...], placeholders: tuple[int, ...],
                   start: dict[str, torch.Tensor], budget: int, project=None, on_step=lambda step: None) -> dict:
    """Adam on the placeholders' embeddings, minimising the erased model's denoising loss on the fitted pictures,
    fresh noise every step (a fixed draw let the soft prompt fit the noise); `project` maps them to what is
    forwarded (the hard attack's projection). The embeddings after the last step."""
    continuous = {name: vector.clone().requires_grad_(True) for name, vector in start.items()}
    optimizer = torch.optim.Adam([{"params": [vector], "lr": step_size(setup.tables[name])}
                                  for name, vector in continuous.items()])
    generator = torch.Generator().manual_seed(setup.seed)
    for step in range(budget):
        rows = fitting_rows(setup.fit_latents, setup.scheduler, generator)
        with learned_tokens(setup.pipeline, setup.family, placeholders, project(continuous) if project else continuous):
            loss = setup.loss(captions, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        on_step(step)
    return {name: vector.detach() for name, vector in continuous.items()}
