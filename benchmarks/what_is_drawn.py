"""What an erased digit's own prompt draws after the default erase, as the judge reads it, and how many of those
images look like a real scan of what they are read as.

    python -m benchmarks.what_is_drawn                                   # each digit alone, and the triples with nine
    python -m benchmarks.what_is_drawn --groups 0,69 -o /tmp/drawn.json  # zero alone, six+nine together

The judge (demo/judge.py, an SVC on the held-out scans) has no "none of these" answer: it reads every image as some
digit, noise too. So beside its reading, each image is counted as *near a real scan* when its distance (8x8, the
judge's 0-16 scale) to the nearest held-out scan of the digit it is read as is no larger than the base model's own
images of that digit ever are (the largest of 40, seeds 3000-3039, on the word prompt). Erases at seed 0, the shipped
pictures; the word prompt, 20 images (seeds 3000-3019, as the robustness benchmark's).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

from demo.data import DIGIT_WORDS
from demo.measure import JUDGED_SEEDS, SAMPLES, erased_pipeline, load_base, prompt_for

CALIBRATION = list(range(3000, 3040))
GROUPS = "0,1,2,3,4,5,6,7,8,9,069,089,289,689,589"  # alone, then the triples whose nine the benchmark found hard


def nearest_scan(features: np.ndarray, digit: int, scans: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image, the distance to the nearest held-out scan of `digit`."""
    own = scans[labels == digit]
    return np.sqrt(((features[:, None, :] - own[None, :, :]) ** 2).sum(-1)).min(1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=GROUPS, help="digits erased together, comma-separated groups")
    parser.add_argument("-o", "--output", default="benchmarks/results/what_is_drawn.json")
    args = parser.parse_args(argv)

    import torch

    from demo.data import heldout_split
    from demo.judge import judge, to_8x8
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.compare import generate
    from fewshot_erase.concepts import ConceptSpec
    from fewshot_erase.errors import EraseWarning

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", EraseWarning)
    parts, generation = load_base()
    x, y, _ = heldout_split()
    scans = x.reshape(len(x), 64).astype(float)

    def drawn(pipe, prompt: str, seeds) -> tuple[np.ndarray, np.ndarray]:
        images = generate(pipe, prompt, seeds, generation, "cpu")
        return to_8x8(images), judge(images)

    bound = {d: float(nearest_scan(drawn(parts.pipeline, prompt_for("word", d), CALIBRATION)[0], d, scans, y).max())
             for d in range(10)}
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for number, group in enumerate(args.groups.split(",")):
            digits = [int(c) for c in group]
            output = Path(workdir) / str(number)
            erase_concepts([ConceptSpec(DIGIT_WORDS[d], (str(SAMPLES / DIGIT_WORDS[d]),)) for d in digits], output,
                           device="cpu")
            pipe = erased_pipeline(parts, output)
            for d in digits:
                features, read = drawn(pipe, prompt_for("word", d), JUDGED_SEEDS)
                near = [int(r) for i, r in enumerate(read)
                        if nearest_scan(features[i:i + 1], int(r), scans, y)[0] <= bound[int(r)]]
                runs.append({"erased": digits, "prompt": DIGIT_WORDS[d],
                             "read_as": dict(sorted(collections.Counter(int(r) for r in read).items())),
                             "near_a_real_scan": dict(sorted(collections.Counter(near).items()))})
                print(json.dumps(runs[-1]), flush=True)
    report = {"settings": vars(args), "images": len(JUDGED_SEEDS), "bound": bound, "runs": runs}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
