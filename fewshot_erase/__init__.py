"""fewshot-erase: erase a concept from a Stable Diffusion model's text encoder with a few real images of it.

    from fewshot_erase import erase
    result = erase("seven", ["sample_images/seven"], "erased/")

Importing this package is cheap; torch and diffusers load when a function that needs them runs.
"""

__version__ = "0.1.0"

from .errors import BadInput, EraseError, EraseWarning, RunFailure  # noqa: E402
from .audit import audit  # noqa: E402  eager and cheap (no torch): resolved lazily, the module would shadow it


def __getattr__(name):
    # Resolved on first use so that `import fewshot_erase` (and `fewshot-erase --help`) stays cheap. The method
    # itself lives in `unlearning.py`: a module named `erase` would shadow this `erase` function once imported.
    if name in ("erase", "EraseResult", "Progress"):
        from . import api

        return getattr(api, name)
    if name == "EraseSettings":
        from .settings import EraseSettings

        return EraseSettings
    raise AttributeError(name)


__all__ = ["erase", "audit", "EraseResult", "EraseSettings", "Progress", "BadInput", "EraseError", "EraseWarning", "RunFailure"]
