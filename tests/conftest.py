"""Session fixtures: tiny pipelines of the real SD 1.x, SD 2.x and SDXL architectures (random weights, the real
CLIP tokenizer), saved once in every form the tool accepts, and a few pictures to erase with."""

import os

# No test may reach the network; set before huggingface_hub reads its constants.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models gain nothing from a second thread, and on a shared 2-core machine a busy core makes two torch threads
# spin-wait 30-60x slower; subprocesses inherit this too.
os.environ["OMP_NUM_THREADS"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent / "fixtures")]
import tiny_pipelines  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


class TinyModel:
    """One family's tiny pipeline and the places it was saved to."""

    def __init__(self, family: str, root: Path):
        self.family = family
        self.pipe = tiny_pipelines.build_tiny_pipeline(family)
        self.folder = tiny_pipelines.save_diffusers_folder(self.pipe, root / "pipeline")
        self.single_file = tiny_pipelines.save_single_file(self.pipe, root / f"{family}.safetensors", family)
        self.config_dir = tiny_pipelines.tiny_config_dir(self.pipe, root / "configs")
        self.hub_cache = root / "hub"
        self.repo_id = f"tiny-tests/{family}"
        tiny_pipelines.save_hub_cache(self.folder, self.hub_cache, self.repo_id)

    def model_args(self, form: str) -> list[str]:
        """CLI arguments that point `erase` at this model in the given form."""
        if form == "folder":
            return ["--model", str(self.folder)]
        if form == "single-file":
            return ["--model", str(self.single_file), "--config", str(self.config_dir)]
        if form == "hub":
            return ["--model", self.repo_id]
        raise ValueError(form)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    built: dict[str, TinyModel] = {}

    def get(family: str) -> TinyModel:
        if family not in built:
            built[family] = TinyModel(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


def write_pictures(folder: Path, count: int = 3, size: int = 40, seed: int = 0) -> Path:
    """Smooth random pictures (a blob on a background), different per seed, larger than the tiny models' 32 px."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    for index in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (size / 6) ** 2))
        colour = rng.uniform(0, 255, 3)
        pixels = (blob[..., None] * colour + (1 - blob[..., None]) * 30).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"picture_{index}.png")
    return folder


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> Path:
    return write_pictures(tmp_path_factory.mktemp("pictures") / "concept")


def erased_output(tiny, pictures) -> Path:
    """`tiny` erased once per session, from its diffusers folder: the same weights as its single file."""
    from fewshot_erase import erase

    output = tiny.folder.parent / "erased"
    if not output.exists():
        erase("tiny robot", [pictures], output, model=str(tiny.folder), steps=2, lr=1e-3)
    return output


@pytest.fixture
def erased(tiny_model, pictures):
    """family -> (its tiny model, its erase output): what apply, export and inspect are tested on."""
    return lambda family: (tiny_model(family), erased_output(tiny_model(family), pictures))
