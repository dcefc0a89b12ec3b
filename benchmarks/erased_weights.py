"""Erased weights, digest by digest: proof that a refactor leaves the weights `erase` writes byte-identical.

Erases every demo digit at each seed with the default settings, and the tiny SD 1.x, SD 2.x and SDXL pipelines with
the erase tests' settings ("tiny robot", 8 steps, lr 1e-3, seed 7, the tests' three pictures), through the public
API only (`fewshot_erase.api.erase_concepts`), so the same script runs on the old code and the new. For each case it
writes the sha256 of every saved tensor (its dtype, shape and raw bytes, read straight from the .safetensors file),
the step count, and the sha256 of erase.json's "losses" and "trajectory". The files themselves differ run to run
(erase.json and the safetensors metadata hold timings), so only these are compared. One thread, always: the weights
are byte-identical only for the same thread count.

    # once, with the old code: the tiny pipelines and the test pictures, saved (the only use of tests/)
    cd /tmp && PYTHONPATH=/tmp/old /work/main/.venv/bin/python /work/main/benchmarks/erased_weights.py \\
        --build-tiny /tmp/tiny_ref --tests /tmp/old/tests
    # the reference, on the old code: run from outside the repo, or the working tree's fewshot_erase comes first
    cd /tmp && PYTHONPATH=/tmp/old /work/main/.venv/bin/python /work/main/benchmarks/erased_weights.py \\
        --out /tmp/ref_digests.json --tiny /tmp/tiny_ref
    # the new code, and the check (exit 1 if any case differs or is missing from either file)
    cd /work/main && .venv/bin/python -m benchmarks.erased_weights --out /tmp/new_digests.json --tiny /tmp/tiny_ref
    .venv/bin/python -m benchmarks.erased_weights --compare /tmp/ref_digests.json /tmp/new_digests.json

    --seeds 0,1,2 (default)   --digits all (default) | 0,7 | none   --tiny DIR (without it: the demo cases only)

The output names the fewshot_erase it ran ("code"): check that it is the tree you meant.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: the weights depend on the thread count
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local; nothing may reach the network

import argparse
import hashlib
import importlib.util
import json
import shutil
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FAMILIES = ("sd1", "sd2", "sdxl")
# tests/test_erase.py's ERASE arguments, as API keywords
TINY_CONCEPT = "tiny robot"
TINY_SETTINGS = {"steps": 8, "lr": 1e-3, "seed": 7}


def sha256_json(value) -> str:
    # json writes floats by repr, which round-trips exactly: equal hashes mean equal numbers
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def safetensors_digests(path: Path) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and raw bytes, from the file's own header (any dtype, no torch)."""
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_size])
    body = data[8 + header_size:]
    digests = {}
    for name, info in header.items():
        if name == "__metadata__":  # holds timings and paths: differs run to run by design
            continue
        begin, end = info["data_offsets"]
        digest = hashlib.sha256(f"{info['dtype']} {info['shape']}\n".encode())
        digest.update(body[begin:end])
        digests[name] = digest.hexdigest()
    return digests


def output_digest(output: Path) -> dict:
    """What must not change: every tensor of every weight file, the step count, the losses and the trajectory."""
    tensors = {}
    for path in sorted(output.rglob("*.safetensors")):
        relative = path.relative_to(output).as_posix()
        tensors.update({f"{relative}:{name}": digest for name, digest in safetensors_digests(path).items()})
    record = json.loads((output / "erase.json").read_text())
    return {"tensors": tensors, "steps": record["steps"], "losses_sha256": sha256_json(record["losses"]),
            "trajectory_sha256": sha256_json(record["trajectory"])}


def erase_case(concept: str, pictures: Path, output: Path, **options) -> dict:
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no --model given: the demo" and the like; warnings change no weight
        erase_concepts([ConceptSpec(concept, (str(pictures),), False, None)], output, device="cpu", overwrite=True,
                       **options)
    digest = output_digest(output)
    shutil.rmtree(output)  # sixty-odd outputs add up; the digest is all that is kept
    return digest


def cases(digits: list[int], seeds: list[int], tiny: Path | None):
    """(name, concept, pictures, options) for every erase to digest."""
    for seed in seeds:
        for digit in digits:
            word = DIGIT_WORDS[digit]
            yield f"demo/{word}/seed{seed}", word, SAMPLES / word, {"seed": seed}
    for family in FAMILIES if tiny else ():
        yield f"tiny/{family}", TINY_CONCEPT, tiny / "pictures", {"model": str(tiny / family / "pipeline"),
                                                                  **TINY_SETTINGS}


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def digest_all(out: Path, digits: list[int], seeds: list[int], tiny: Path | None) -> None:
    import torch

    import fewshot_erase

    torch.set_num_threads(1)
    code = str(Path(fewshot_erase.__file__).resolve().parent)
    print(f"fewshot_erase from {code}", flush=True)
    results = {"code": code, "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name, concept, pictures, options in cases(digits, seeds, tiny):
            clock = time.perf_counter()
            digest = erase_case(concept, pictures, Path(workdir) / name.replace("/", "-"), **options)
            results["cases"][name] = digest
            write_json(out, results)  # after every case: a run stopped early keeps what it digested
            print(f"{name}: {digest['steps']} steps, {time.perf_counter() - clock:.1f} s", flush=True)
    print(f"{len(results['cases'])} cases in {time.perf_counter() - started:.0f} s: {out}", flush=True)


def compare(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    for key in ("torch", "threads"):
        if a.get(key) != b.get(key):  # not a failure, but the likely cause of one
            print(f"note: {key} differs: {a.get(key)} against {b.get(key)}")
    differing = 0
    for name in sorted(a["cases"].keys() | b["cases"].keys()):
        if name not in b["cases"] or name not in a["cases"]:
            print(f"{name}: only in {a_path if name in a['cases'] else b_path}")
            differing += 1
            continue
        x, y = a["cases"][name], b["cases"][name]
        if x == y:
            continue
        differing += 1
        fields = [field for field in ("steps", "losses_sha256", "trajectory_sha256") if x[field] != y[field]]
        names = x["tensors"].keys() | y["tensors"].keys()
        tensors = sorted(n for n in names if x["tensors"].get(n) != y["tensors"].get(n))
        if tensors:
            fields.append(f"{len(tensors)} tensors ({', '.join(tensors[:3])}{', ...' if len(tensors) > 3 else ''})")
        print(f"{name}: {'; '.join(fields)} (steps {x['steps']} against {y['steps']})")
    total = len(a["cases"].keys() | b["cases"].keys())
    verdict = "" if differing else ": the erased weights are unchanged"
    print(f"{total - differing} of {total} cases identical{verdict}")
    return 1 if differing else 0


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny(root: Path, tests: Path) -> None:
    """The tests' own builders: conftest.py's pictures, and tiny_pipelines.py (which conftest imports)."""
    import torch

    torch.set_num_threads(1)
    conftest = load_module(tests / "conftest.py")
    for family in FAMILIES:
        folder = conftest.tiny_pipelines.save_diffusers_folder(conftest.tiny_pipelines.build_tiny_pipeline(family),
                                                               root / family / "pipeline")
        print(f"{family}: {folder}", flush=True)
    print(f"pictures: {conftest.write_pictures(root / 'pictures')}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the digests of every case here")
    parser.add_argument("--seeds", default="0,1,2", help="demo erase seeds")
    parser.add_argument("--digits", default="all", help="'all', 'none' or a list such as 0,7")
    parser.add_argument("--tiny", type=Path, help="folder made by --build-tiny: also erase its three pipelines")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="exit 1 if any case differs")
    parser.add_argument("--build-tiny", type=Path, metavar="DIR", help="save the tiny pipelines and pictures here")
    parser.add_argument("--tests", type=Path, default=REPO / "tests", help="the tests folder --build-tiny uses")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.build_tiny:
        build_tiny(args.build_tiny, args.tests)
        return 0
    if not args.out:
        parser.error("give --out FILE, --compare A B or --build-tiny DIR")
    digits = {"all": list(range(10)), "none": []}.get(args.digits)
    digits = digits if digits is not None else [int(d) for d in args.digits.split(",")]
    digest_all(args.out, digits, [int(s) for s in args.seeds.split(",")], args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
