"""Data split for the embedded digits demo (scikit-learn's bundled UCI digits).

Pure, seeded functions.  The HELD-OUT split trains the judge and supplies the
sample images; the TRAINING split alone trains the generator (VAE, text encoder, UNet).
"""
from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.30
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption templates used in training.  "{w}" is the digit word, "{n}" the numeral.
WORD_TEMPLATES = (
    "a photo of the digit {w}",
    "a handwritten {w}",
    "{w}",
    "the digit {w}",
    "a picture of a {w}",
    "the number {w}",
)
NUMERAL_TEMPLATES = (
    "{n}",
    "a handwritten {n}",
    "the digit {n}",
    "a photo of the digit {n}",
    "the number {n}",
)
EMPTY_CAPTION_SHARE = 0.12
# Kept out of training entirely (robustness check).
HELDOUT_TEMPLATES = ("the numeral {w}", "the numeral {n}")
# Other ways to name each digit, used by no erase template: implicit prompts. Taught in training's last phase, which
# learns only the token embeddings of these words that no caption above uses, so every erase is unchanged by it.
IMPLICIT_FORMS = {
    "spanish": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    "roman": ("nulla", "i", "ii", "iii", "iv", "v", "vi", "vii", "viii", "ix"),  # "nulla": the medieval zero
    "description": ("nothing at all", "a single stroke", "a pair", "a trio", "the sides of a square",
                    "the fingers of a hand", "half a dozen", "the days of a week", "the legs of a spider",
                    "the lives of a cat"),
}
IMPLICIT_TEMPLATES = ("{spanish}", "a handwritten {spanish}", "the number {spanish}",
                      "{roman}", "a handwritten {roman}", "the number {roman}", "{description}")
# Prompts used for evaluation / demo.
EVAL_PROMPTS = {
    "word": "a photo of the digit {w}",
    "numeral": "a photo of the digit {n}",
    "heldout_word": "the numeral {w}",
    "heldout_numeral": "the numeral {n}",
    "implicit_spanish": "a handwritten {spanish}",
    "implicit_roman": "the number {roman}",
    "implicit_description": "{description}",
}


def load_digits_arrays():
    """(images [N,8,8] float in 0..16, targets [N] int) straight from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def split_indices(seed: int = SPLIT_SEED, fraction: float = HELDOUT_FRACTION):
    """Stratified split: returns (train_idx, heldout_idx), sorted index arrays into load_digits()."""
    from sklearn.model_selection import train_test_split

    _, y = load_digits_arrays()
    idx = np.arange(len(y))
    tr, ho = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    return np.sort(tr), np.sort(ho)


def train_split():
    x, y = load_digits_arrays()
    tr, _ = split_indices()
    return x[tr], y[tr], tr


def heldout_split():
    x, y = load_digits_arrays()
    _, ho = split_indices()
    return x[ho], y[ho], ho


def caption(digit: int, template: str) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=str(digit), **{form: names[digit] for form, names in IMPLICIT_FORMS.items()})


def training_captions(digit: int):
    return [caption(digit, t) for t in WORD_TEMPLATES + NUMERAL_TEMPLATES]


def implicit_captions(digit: int):
    return [caption(digit, t) for t in IMPLICIT_TEMPLATES]


def sample_caption(digit: int, rng: np.random.Generator) -> str:
    """Random training caption (empty with probability EMPTY_CAPTION_SHARE)."""
    if rng.random() < EMPTY_CAPTION_SHARE:
        return ""
    caps = training_captions(digit)
    return caps[rng.integers(len(caps))]
