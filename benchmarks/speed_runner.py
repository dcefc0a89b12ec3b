"""The speed and memory benchmark behind `python -m benchmarks.speed`: cases, workers, the floor, the verdicts.

Every case runs the real erase in fresh processes:

* a worker that calls the Python API (`erase_concepts`, exactly what the CLI calls) and reads the time of each
  phase from the record it writes, its peak memory, and then, in the same process on the same device, the floor;
* the whole CLI command (`python -m fewshot_erase erase ...`), timed from the outside like a shell would.

The floor is the least a training step could cost: one forward and one backward of the frozen UNet with respect to
its conditioning only, at the erase's batch, resolution, dtype and device. Everything the loop does beyond that (the
text encoders forward and backward, the optimizer, tokenizing) shows up as the ratio loop / floor. Right before each
whole-CLI run, a fresh interpreter that only imports torch and the model classes: what no erase can avoid paying.

Full-size models (sd1, sd2, sdxl) are the packaged configs of the families with random weights, saved once to a
local folder (fp16, as checkpoints are usually shipped) so that "load" is a real load from disk; the time of a step
does not depend on the values of the weights.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fewshot_erase.errors import BadInput, RunFailure
from fewshot_erase.models import CONFIGS_DIR, DEMO_DIR, dtype_keyword

REPORT_FORMAT = "fewshot-erase-bench/1"
FULL_SIZE = ("sd1", "sd2", "sdxl")
CONCEPT = "seven"
REPO = Path(__file__).resolve().parent.parent
SAMPLE_PICTURES = REPO / "sample_images" / CONCEPT
# What no erase can avoid: the interpreter, torch, and the classes of the models it loads.
IMPORT_FLOOR = ("import torch; from diffusers import AutoencoderKL, UNet2DConditionModel; "
                "from transformers import CLIPTextModel")
PHASES = ("import", "images", "load", "prepare", "encode", "identity", "train", "save")
TOKENS = 77  # CLIP's context: the conditioning is always 77 token states
MB = 1 << 20


@dataclass(frozen=True)
class Case:
    model: str  # "demo", one of FULL_SIZE (random weights), or a diffusers folder
    resolution: int | None = None  # None: the model's own
    steps: int | None = None  # None: the default erase's length
    low_memory: bool = False  # erase with --low-memory (and measure the floor the same way)
    # The published method alone: no retain term, no stopping checks, 4 epochs unless `steps`. The loop is then exactly what the floor
    # prices (plus the encoder and Adam); the default erase may do more (the demo preserves and checks).
    bare: bool = False

    @property
    def label(self) -> str:
        return (f"{self.model} @ {self.resolution or 'default'}" + (" low-memory" if self.low_memory else "")
                + (" bare" if self.bare else ""))


# ----------------------------------------------------------------------------------------------------------------
# Models and pictures
# ----------------------------------------------------------------------------------------------------------------
def random_pipeline(family: str, folder: Path) -> Path:
    """The family's full-size architecture from its packaged configs, with random weights, saved as an fp16
    diffusers folder. Built once: an existing folder is reused."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import torch
    import transformers

    from fewshot_erase import families
    from fewshot_erase.models import family_tokenizers, quiet_libraries

    quiet_libraries()
    configs = CONFIGS_DIR / family
    index = json.loads((configs / "model_index.json").read_text())
    components = family_tokenizers(families.FAMILIES[family])
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or name in components:
            continue
        library, class_name = entry
        if library == "transformers":
            cls = getattr(transformers, class_name)
            components[name] = cls(cls.config_class.from_json_file(str(configs / name / "config.json")))
        else:
            cls = getattr(diffusers, class_name)
            components[name] = cls.from_config(cls.load_config(str(configs / name)))
        if isinstance(components[name], torch.nn.Module):
            components[name].to(torch.float16)
    if index["_class_name"] == "StableDiffusionPipeline":
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline = getattr(diffusers, index["_class_name"])(**components)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        pipeline.save_pretrained(str(staging), safe_serialization=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def model_folder(model: str, workdir: Path) -> Path:
    if model == "demo":
        if not (DEMO_DIR / "model_index.json").is_file():
            raise RunFailure(f"the embedded demo model is missing from {DEMO_DIR}; benchmark a full-size model instead")
        return DEMO_DIR
    if model in FULL_SIZE:
        folder = workdir / "models" / model
        if not (folder / "model_index.json").is_file():
            # In a child process: SDXL takes 14 GB while it is built, which this process should not keep.
            built = timed_process([sys.executable, "-m", "benchmarks.speed_runner", "build", model, str(folder)], _child_env())
            if built["returncode"] != 0:
                raise RunFailure(f"building the random-weight {model} failed: {built['stderr'].strip().splitlines()[-1:]}")
        return folder
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise BadInput(f"--model {model}: not demo, {', '.join(FULL_SIZE)} or a diffusers pipeline folder")
    return folder


def pictures(workdir: Path, count: int = 6, size: int = 512) -> Path:
    """The demo's own sample pictures in a source checkout; elsewhere smooth synthetic ones (an erase reads them
    once and encodes them once, so what they show does not change its speed)."""
    if SAMPLE_PICTURES.is_dir():
        return SAMPLE_PICTURES
    folder = workdir / "pictures"
    if not folder.is_dir():
        import numpy as np
        from PIL import Image

        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        ys, xs = np.mgrid[0:size, 0:size] / size
        for index in range(count):
            cy, cx = rng.uniform(0.3, 0.7, 2)
            blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 0.02)[..., None]
            pixels = blob * rng.uniform(0, 255, 3) + (1 - blob) * 30
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"picture_{index}.png")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The floor
# ----------------------------------------------------------------------------------------------------------------
def unet_floor(unet, batch: int, resolution: int, latent_factor: int, repeats: int, device, dtype) -> dict:
    """Seconds for `repeats` bare steps of the frozen UNet: forward, MSE, backward to the conditioning only.
    One step first, untimed, so that kernels and allocations are warm: the floor is the cheapest steps can be.
    On a CPU each step's own time is kept too (on a GPU steps overlap, and only their sum means anything)."""
    import torch
    import torch.nn.functional as F

    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    size = resolution // latent_factor

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    noisy, goal = random(batch, unet.config.in_channels, size, size), random(batch, unet.config.out_channels, size, size)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    states = random(batch, TOKENS, unet.config.cross_attention_dim).requires_grad_()
    cond = {"encoder_hidden_states": states}
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding is conditioning too
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch).to(device, dtype)
        cond["added_cond_kwargs"] = {"text_embeds": random(batch, pooled_dim).requires_grad_(), "time_ids": time_ids}

    def step():
        F.mse_loss(unet(noisy, timesteps, **cond).sample.float(), goal.float()).backward()

    step()
    _synchronize(device)
    marks = [time.perf_counter()]
    for _ in range(repeats):
        step()
        marks.append(time.perf_counter())
    _synchronize(device)  # once, at the end: the floor lets the device run ahead of Python, as a loop could
    seconds = time.perf_counter() - marks[0]
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    return {"seconds": seconds, "step_seconds": seconds / repeats,
            "each_step": [b - a for a, b in zip(marks, marks[1:])] if on_cpu else []}


def _synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux and macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def _cuda_peak_mb(device) -> float | None:
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / MB


# ----------------------------------------------------------------------------------------------------------------
# The worker: one erase through the API, then the floor, in a fresh process
# ----------------------------------------------------------------------------------------------------------------
def _phase_clock(device):
    """A Progress that notes, per phase, when each step ended and the memory peak so far when the phase ended."""
    import contextlib

    from fewshot_erase.api import Progress

    class Clock(Progress):
        def __init__(self):
            self.steps: dict[str, list[float]] = {}
            self.memory: dict[str, dict] = {}

        @contextlib.contextmanager
        def phase(self, name, total=None):
            marks = self.steps.setdefault(name, [time.perf_counter()])
            yield lambda count=1, **info: marks.append(time.perf_counter())
            self.memory[name] = {"rss_mb": peak_rss_mb(), "cuda_mb": _cuda_peak_mb(device)}

    return Clock()


def run_worker(spec: dict) -> dict:
    started = time.perf_counter()
    from fewshot_erase.models import import_libraries, resolve_device

    import_libraries()
    imported = time.perf_counter() - started

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    device = resolve_device(spec["device"])
    clock = _phase_clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    options = {key: spec[key] for key in ("steps", "resolution", "device", "dtype", "low_memory") if spec.get(key)}
    if spec.get("bare"):  # and the published schedule, 4 epochs, unless the case sets the steps
        options.update(preserve_weight=0.0, until=None, **({} if spec.get("steps") else {"epochs": 4}))
    model = None if spec["model"] == "demo" else spec["folder"]
    result = erase_concepts([ConceptSpec(CONCEPT, (spec["pictures"],), False, None)], spec["output"], model=model,
                            progress=clock, **options)
    record = result.record
    memory = {"peak_rss_mb": peak_rss_mb(), "cuda_peak_allocated_mb": _cuda_peak_mb(device),
              "cuda_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / MB if device.type == "cuda" else None,
              "by_phase": clock.memory}

    folder = Path(spec["folder"])
    dtype = getattr(torch, record["dtype"])
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), **{dtype_keyword(): dtype}).to(device)
    if spec.get("low_memory"):  # the erase recomputed activations in the backward pass; so does its floor
        unet.enable_gradient_checkpointing()
    latent_factor = 2 ** (len(AutoencoderKL.load_config(str(folder / "vae"))["block_out_channels"]) - 1)
    steps = record["steps"]
    settings = record["settings"]
    floor = unet_floor(unet, settings["batch_size"], settings["resolution"], latent_factor, steps, device, dtype)
    marks = clock.steps.get("erasing", [])  # the API's name for the training loop's phase
    step_times = [later - earlier for earlier, later in zip(marks, marks[1:])]
    # The worker imported before the API's clock started; the API's own import phase then found it all loaded.
    timings = {**record["timings"], "import": imported + record["timings"].get("import", 0.0),
               "total": imported + record["timings"]["total"]}
    return {
        "family": record["base"]["family"],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": record["dtype"],
        "resolution": settings["resolution"],
        "batch_size": settings["batch_size"],
        "steps": steps,
        "preserve": len(settings["preserve"]) if settings["preserve_weight"] > 0 else 0,
        "threads": torch.get_num_threads(),
        "phases": timings,
        "loop": {"seconds": timings["train"], "step_seconds": step_times},
        "floor": floor,
        "memory": memory,
    }


def _child_main(argv: list[str]) -> None:
    """The two jobs run in child processes: `build FAMILY FOLDER`, and `worker SPEC.json`."""
    if argv[0] == "build":
        random_pipeline(argv[1], Path(argv[2]))
    else:
        spec = json.loads(Path(argv[1]).read_text())
        Path(spec["result"]).write_text(json.dumps(run_worker(spec)))


# ----------------------------------------------------------------------------------------------------------------
# Processes, timed from the outside
# ----------------------------------------------------------------------------------------------------------------
def timed_process(command: list[str], env: dict | None = None) -> dict:
    """Wall seconds from start to exit, the exit code, the child's own peak RSS, and the end of its stderr."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = child.stderr.read()
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        rss = usage.ru_maxrss / MB if sys.platform == "darwin" else usage.ru_maxrss / 1024
    else:
        child.wait()
        rss = None
    return {"wall_s": time.perf_counter() - started, "returncode": child.returncode, "peak_rss_mb": rss,
            "stderr": stderr.decode(errors="replace")[-2000:]}


def _child_env() -> dict:
    # A benchmark never reaches the network; everything it loads is on local disk. The children run this
    # checkout's benchmarks package.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": path}


def erase_command(case: Case, folder: Path, images: Path, output: Path, device: str, dtype: str) -> list[str]:
    command = [sys.executable, "-m", "fewshot_erase", "erase", CONCEPT, str(images), "-o", str(output), "-q"]
    if case.model != "demo":
        command += ["--model", str(folder)]
    if case.resolution:
        command += ["--resolution", str(case.resolution)]
    if case.steps:
        command += ["--steps", str(case.steps)]
    if case.low_memory:
        command += ["--low-memory"]
    if case.bare:
        command += ["--no-preserve", "--until", "steps"] + ([] if case.steps else ["--epochs", "4"])
    return command + ["--device", device, "--dtype", dtype]


def measure_case(case: Case, folder: Path, images: Path, workdir: Path, device: str, dtype: str,
                 with_cli: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="run-", dir=workdir) as scratch:
        scratch = Path(scratch)
        spec = {"model": case.model, "folder": str(folder), "pictures": str(images), "output": str(scratch / "api"),
                "result": str(scratch / "result.json"), "steps": case.steps, "resolution": case.resolution,
                "device": device, "dtype": dtype, "low_memory": case.low_memory, "bare": case.bare}
        (scratch / "spec.json").write_text(json.dumps(spec))
        worker = timed_process([sys.executable, "-m", "benchmarks.speed_runner", "worker", str(scratch / "spec.json")],
                               _child_env())
        if worker["returncode"] != 0:
            raise RunFailure(f"the benchmark of {case.label} failed: {worker['stderr'].strip().splitlines()[-1:]}")
        report = {"case": asdict(case), **json.loads((scratch / "result.json").read_text())}
        report["worker_wall_s"] = worker["wall_s"]
        if with_cli:
            # The import floor right before the CLI run, so that both meet the same moment of a shared machine.
            import_floor = timed_process([sys.executable, "-c", IMPORT_FLOOR], _child_env())["wall_s"]
            cli = timed_process(erase_command(case, folder, images, scratch / "cli", device, dtype), _child_env())
            if cli["returncode"] != 0:
                raise RunFailure(f"the CLI erase of {case.label} failed: {cli['stderr'].strip().splitlines()[-1:]}")
            phases = json.loads((scratch / "cli" / "erase.json").read_text())["timings"]
            # Outside the API's own clock: the interpreter starting, the CLI's imports, and the exit.
            report["cli"] = {"wall_s": cli["wall_s"], "peak_rss_mb": cli["peak_rss_mb"], "phases": phases,
                             "outside_api_s": cli["wall_s"] - phases["total"], "import_floor_s": import_floor,
                             "over_import_floor_s": cli["wall_s"] - import_floor}
    return summarise(report)


def summarise(report: dict) -> dict:
    """The figures the targets speak of, derived from one case's raw measurements."""
    loop, floor = report["loop"], report["floor"]
    steady = sorted(loop["step_seconds"][1:] or loop["step_seconds"])
    report["ratio"] = loop["seconds"] / floor["seconds"] if floor["seconds"] else None
    # Without the first step (warm-up: allocations, kernel selection) the loop is compared with the warm floor.
    report["steady_ratio"] = steady[len(steady) // 2] / floor["step_seconds"] if steady and floor["step_seconds"] else None
    # On a shared machine a step is slowed by whatever else runs at that moment; the fastest step of each is the
    # figure least disturbed by it.
    each = floor.get("each_step")
    report["best_step_ratio"] = min(loop["step_seconds"]) / min(each) if each and loop["step_seconds"] else None
    return report


def interpreter_costs(repeats: int) -> dict:
    """The CLI's --help and usage-error answers, each in a fresh interpreter, `repeats` times. (The import floor is
    measured beside each whole-CLI run instead.)"""
    runs = {"help_s": [], "usage_error_s": []}
    commands = {
        "help_s": [sys.executable, "-m", "fewshot_erase", "--help"],
        "usage_error_s": [sys.executable, "-m", "fewshot_erase", "erase"],
    }
    for _ in range(repeats):
        for key, command in commands.items():
            runs[key].append(timed_process(command, _child_env())["wall_s"])
    return runs


# ----------------------------------------------------------------------------------------------------------------
# The speed targets (docs/speed.md)
# ----------------------------------------------------------------------------------------------------------------
GB = 1024.0  # MB per GB in the memory targets


def verdicts(report: dict) -> list[dict]:
    """Each target the report can judge: what was measured, the limit, and whether it is met."""
    found = []

    def judge(target: str, value, limit: float, unit: str):
        if value is not None:
            found.append({"target": target, "value": round(value, 3), "limit": limit, "unit": unit, "met": value <= limit})

    costs = report["interpreter"]
    judge("--help answers", min(costs["help_s"]), 1.0, "s")
    judge("argument error answers", min(costs["usage_error_s"]), 1.0, "s")
    for case in report["cases"]:
        low_memory = case["case"].get("low_memory", False)
        bare = case["case"].get("bare", False)
        label = (f"{case['case']['model']} @ {case['resolution']} on {case['device']}" + (" --low-memory" if low_memory else "")
                 + (" bare" if bare else ""))
        judge(f"loop / floor, {label}", case["ratio"], 1.25, "x")
        cpu, gpu = case["device"] == "cpu", case["device"].startswith("cuda")
        default_run = case["case"]["resolution"] is None and case["case"]["steps"] is None and not bare
        cli_wall = min(run["wall_s"] for run in case["cli_runs"]) if "cli" in case else None
        if cpu and case["case"]["model"] == "demo" and default_run and "cli" in case:
            over = sorted(run["over_import_floor_s"] for run in case["cli_runs"])
            judge("demo CLI erase minus import floor (CPU, median of pairs)", over[len(over) // 2], 3.0, "s")
        if gpu and default_run and case["family"] == "sd1" and not low_memory:
            judge(f"training loop, {label}", case["phases"]["train"], 2.0, "s")
            judge(f"whole CLI run, {label}", cli_wall, 10.0, "s")
        if gpu and default_run and case["family"] in ("sd1", "sdxl"):
            limit = 6.0 if case["family"] == "sd1" else 12.0
            judge(f"peak GPU memory, {label}", case["memory"]["cuda_peak_allocated_mb"] / GB, limit, "GB")
    return found


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(cases: list[Case], workdir: Path, *, device: str = "auto", dtype: str = "auto", repeats: int = 1,
                  with_cli: bool = True, on_case=lambda case: None) -> dict:
    """Measure every case `repeats` times; per case the repetition with the fastest loop is kept whole (its floor
    and ratio come from the same process), all repetitions are kept under `runs`."""
    if repeats < 1:
        raise BadInput(f"--repeat must be at least 1, got {repeats}")
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    # Every model is found or built, and the pictures written, before anything is timed.
    folders = {case.model: model_folder(case.model, workdir) for case in cases}
    images = pictures(workdir)
    report = {"format": REPORT_FORMAT, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "interpreter": interpreter_costs(repeats), "cases": []}
    for case in cases:
        on_case(case)
        runs = [measure_case(case, folders[case.model], images, workdir, device, dtype, with_cli) for _ in range(repeats)]
        best = min(runs, key=lambda run: run["loop"]["seconds"])
        cli_runs = [{key: run["cli"][key] for key in ("wall_s", "import_floor_s", "over_import_floor_s")}
                    for run in runs] if with_cli else []
        report["cases"].append({**best, "cli_runs": cli_runs, "runs": runs if repeats > 1 else []})
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["targets"] = verdicts(report)
    return report


def default_workdir() -> Path:
    return REPO / ".bench"  # ignored by git; the random-weight models are built there once


if __name__ == "__main__":
    _child_main(sys.argv[1:])
