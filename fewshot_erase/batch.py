"""Running a batch of jobs (`batch_manifest.read_jobs` reads them): each job's erase, then what follows it (`apply`,
`export`). A job whose output already holds its erase is skipped, so a rerun does only what is left; a job's bad
input or failure is its own and the others go on. Locally one job after another, or as tasks on a Ray cluster
(Ray is imported only then)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

from .batch_manifest import SETTING_TYPES, FollowUp, Job
from .errors import BadInput, EraseError, EraseWarning, first_line
from .settings import EraseSettings, with_implied
from .writers.atomic import exists

DONE, SKIPPED, FAILED, NOT_RUN = "done", "skipped", "failed", "not run"
# Ray reruns a task whose worker process died (a lost node, an OOM kill) this many times; a task that returned a
# failure is never rerun: bad input stays bad.
RETRIES = 3
# What only the run decides, so a record cannot be checked against them before running: the resolution a model
# implies, and the automatic preserve set (the nearest concepts by the model's own encoder).
DECIDED_BY_THE_RUN = ("resolution", "preserve")
DEFAULTS = {field.name: field.default for field in dataclasses.fields(EraseSettings)}


def differences(job: Job, record: dict) -> list[str]:
    """What in an existing erase record differs from the erase `job` would run: [] means the output is this job's.

    Compared: the concepts (name, style, anchor) in order, each picture's file name and sha256, the base model as
    the manifest gives it, and every setting the job chooses; a setting the job leaves out must be at the tool's
    default or the model's recommendation (the record lists which it took from the model)."""
    from . import images

    found = []
    if record.get("base", {}).get("model") != (job.model or "demo"):
        found.append(f"base model {record.get('base', {}).get('model')!r}, the job's is {job.model or 'demo'!r}")
    recorded = record.get("concepts", [])
    style = job.settings.get("style", False)
    wanted = [(spec.concept, spec.style or style, spec.anchor) for spec in job.specs]
    have = [(c.get("concept"), c.get("style"), c.get("anchor")) for c in recorded]
    if have != wanted:
        found.append(f"concepts {have}, the job's are {wanted}")
    for spec, entry in zip(job.specs, recorded):
        pictures = [{"name": path.name, "sha256": images.sha256_bytes(path.read_bytes())}
                    for path in images.find_image_files(spec.images)]
        if entry.get("images") != pictures:
            found.append(f"other pictures of {spec.concept!r} (names or contents differ)")
    settings = record.get("settings", {})
    from_model = set(record.get("recommended_by_model", ()))
    chosen = with_implied(job.settings, {})
    for name in SETTING_TYPES:
        if name in chosen:
            expected = chosen[name]
        elif name in DECIDED_BY_THE_RUN or name in from_model:
            continue
        else:
            expected = DEFAULTS[name]
        if _plain(settings.get(name)) != _plain(expected):
            found.append(f"{name} {settings.get(name)!r}, the job's is {expected!r}")
    return found


def _plain(value):
    """As JSON holds it: tuples are lists."""
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def erase_step(job: Job, overwrite: bool = False, progress=None) -> dict:
    """The job's erase, or its skip when the output already holds it. Never raises for the tool's errors or a bug:
    the outcome says what failed, so one job cannot stop the others."""
    return _step(lambda: _erase(job, overwrite, progress))


_KEPT = []  # this process's KeptModel, made on its first erase: a worker loads a model once for consecutive jobs


def _kept_model():
    from .models import KeptModel

    if not _KEPT:
        _KEPT.append(KeptModel())
    return _KEPT[0]


def _erase(job: Job, overwrite: bool, progress) -> dict:
    from .api import EraseResult, erase_concepts
    from .outputs import read_record

    if exists(job.output):
        try:
            record = read_record(job.output)
        except BadInput:
            found = ["it is not an erase output"]
        else:
            found = differences(job, record)
            if not found:
                return {"status": SKIPPED, "report": EraseResult(job.output, record).summary()}
        if not overwrite:
            raise BadInput(f"output {job.output} exists but is not this job's erase ({found[0]}); remove it, or pass "
                           "--overwrite to replace it")
    with room_for(job.output):
        result = erase_concepts(list(job.specs), job.output, model=job.model, overwrite=overwrite, progress=progress,
                                kept=_kept_model(), **job.loading, **job.settings)
    return {"status": DONE, "report": result.summary()}


@contextlib.contextmanager
def room_for(output: Path):
    """A manifest names its outputs' folders (out/...): inside, those missing are made, on the machine the job runs;
    a job that fails takes the ones it made with it (nothing written)."""
    made = [folder for folder in [output.parent, *output.parent.parents] if not folder.exists()]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"cannot create the folder {output.parent} for {output} ({error.strerror or error}); "
                       "choose a writable output path") from None
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first; one another job has written into meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def follow_up_step(job: Job, follow_up: FollowUp, erased: dict, overwrite: bool = False, progress=None) -> dict:
    """`apply` or `export` of the job's erase output. A target that exists is kept when the erase was skipped (it
    was made from that same output), and replaced only with --overwrite when the erase ran again."""
    if erased["status"] not in (DONE, SKIPPED):
        return {"kind": follow_up.kind, "output": str(follow_up.output), "status": NOT_RUN,
                "error": "not run: the erase failed", "seconds": 0.0}
    return {"kind": follow_up.kind, "output": str(follow_up.output),
            **_step(lambda: _follow_up(job, follow_up, erased["status"] == SKIPPED, overwrite, progress))}


def _follow_up(job: Job, follow_up: FollowUp, erase_skipped: bool, overwrite: bool, progress) -> dict:
    from .api import Progress

    if exists(follow_up.output):
        if erase_skipped:
            return {"status": SKIPPED}
        if not overwrite:
            raise BadInput(f"{follow_up.output} exists, made from an earlier erase than the one just run; remove it, "
                           "or pass --overwrite to replace it")
    with room_for(follow_up.output), (progress or Progress()).phase(f"{follow_up.kind} {follow_up.output.name}"):
        options = follow_up.options
        if follow_up.kind == "apply":
            from .apply import apply

            result = apply(job.output, options["checkpoint"], follow_up.output, force=options["force"],
                           overwrite=overwrite, allow_pickle=options["allow_pickle"])
        else:
            from .export import export

            result = export(job.output, options["fmt"], follow_up.output, rank=options["rank"], model=options["model"],
                            overwrite=overwrite)
    return {"status": DONE, "report": result.summary()}


def _step(work) -> dict:
    """Run one step: its outcome with its wall and CPU time, the tool's warnings it raised and where it ran."""
    started, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", EraseWarning)
        try:
            outcome = work()
        except EraseError as error:
            outcome = {"status": FAILED, "error": str(error), "exit_code": error.exit_code}
        except Exception as error:  # a bug or an environment fault: still this job's alone
            outcome = {"status": FAILED, "exit_code": 1,
                       "error": f"unexpected {type(error).__name__}: {first_line(error)}"}
    outcome["seconds"] = time.perf_counter() - started
    outcome["cpu_seconds"] = time.process_time() - cpu  # well below `seconds`: the worker waited for a busy CPU
    outcome["warnings"] = [str(warning.message) for warning in caught]
    outcome["worker"] = {"host": socket.gethostname(), "pid": os.getpid()}
    return outcome


def job_line(job: Job, erased: dict, follow_ups: list[dict]) -> dict:
    """The job's line in results.jsonl: its status (failed if any step failed; skipped if every step was), the
    erase's outcome and report, and each follow-up's."""
    steps = [erased, *follow_ups]
    if any(step["status"] in (FAILED, NOT_RUN) for step in steps):
        status = FAILED
    else:
        status = SKIPPED if all(step["status"] == SKIPPED for step in steps) else DONE
    error = next((step["error"] for step in steps if step["status"] == FAILED), None)
    return {"job": job.number, "line": job.line, "name": job.name, "output": str(job.output), "status": status,
            "error": error, "seconds": sum(step["seconds"] for step in steps),
            "cpu_seconds": sum(step.get("cpu_seconds", 0.0) for step in steps),
            "erase": erased, "follow_ups": follow_ups}


def run_job(job: Job, overwrite: bool = False, progress=None) -> dict:
    erased = erase_step(job, overwrite, progress)
    return job_line(job, erased, [follow_up_step(job, item, erased, overwrite, progress) for item in job.follow_ups])


def run_local(jobs: list[Job], *, overwrite: bool = False, progress=None, starting=None) -> Iterator[dict]:
    """On this machine, one job after another, in manifest order: each job's line as it finishes."""
    started = time.perf_counter()
    for job in jobs:
        if starting:
            starting(job)
        yield {**run_job(job, overwrite, progress), "finished_at": time.perf_counter() - started}


def run_ray(jobs: list[Job], *, address: str = "local", workers: int | None = None, timeout: float = 30.0,
            overwrite: bool = False) -> Iterator[dict]:
    """On a Ray cluster: each erase a task (one GPU where the cluster has them), each apply and export a CPU task
    that waits for its erase. Each job's line as it finishes, in the order they finish. `address` "local" starts
    a cluster on this machine with `workers` CPUs; anything else must answer within `timeout` seconds. Connects
    when called, so a cluster that does not answer is BadInput before any job is submitted."""
    return _ray_lines(connect(address, workers, timeout), jobs, overwrite)


def _ray_lines(ray, jobs: list[Job], overwrite: bool) -> Iterator[dict]:
    try:
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        erase_task = ray.remote(erase_step).options(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=RETRIES,
                                                    retry_exceptions=False)
        follow_up_task = ray.remote(follow_up_step).options(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)
        started, tasks = time.perf_counter(), {}
        for job in jobs:
            erased = erase_task.remote(job, overwrite)
            follow_ups = [follow_up_task.remote(job, item, erased, overwrite) for item in job.follow_ups]
            tasks[job.number] = [erased, *follow_ups]
        owners = {task: job for job in jobs for task in tasks[job.number]}
        unfinished = {job.number: len(tasks[job.number]) for job in jobs}
        while owners:
            ready, _ = ray.wait(list(owners), num_returns=1)
            job = owners.pop(ready[0])
            unfinished[job.number] -= 1
            if unfinished[job.number]:
                continue
            erased, *follow_ups = (_fetched(ray, task) for task in tasks.pop(job.number))
            for item, outcome in zip(job.follow_ups, follow_ups):
                outcome.setdefault("kind", item.kind)
                outcome.setdefault("output", str(item.output))
            yield {**job_line(job, erased, follow_ups), "finished_at": time.perf_counter() - started}
    finally:
        ray.shutdown()


def _fetched(ray, task) -> dict:
    try:
        return ray.get(task)
    except ray.exceptions.RayError as error:
        return {"status": FAILED, "exit_code": 1, "seconds": 0.0,
                "error": f"the Ray task was lost ({first_line(error, 120)}): its worker died {RETRIES + 1} times, or "
                         "the erase it needed was lost; see the Ray logs, then rerun to do what is left"}


# Connecting in a child process bounds the wait: ray.init retries an address that does not answer for minutes
# and prints its own lines while it does; a child can be stopped, and its output kept out of ours.
PROBE = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); ray.shutdown()"


def connect(address: str, workers: int | None, timeout: float):
    """The `ray` module, initialised: a new local cluster (`address` "local", `workers` CPUs) or the running
    cluster at `address` ("auto": the one `ray start --head` started here), which must answer within `timeout`."""
    try:
        import ray
    except ImportError:
        raise BadInput("--ray needs Ray, which is not installed; pip install 'fewshot-erase[ray]'") from None
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    if address == "local":
        ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False, **quiet)
        return ray
    if workers is not None:
        raise BadInput("--workers sizes the local cluster that --ray starts; a running cluster has the workers it was "
                       "started with: drop --workers, or drop the address")
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BadInput(f"the Ray cluster at {address} did not answer within {timeout:g} s; check the address, or start "
                       "one here with `ray start --head` and pass --ray auto") from None
    if probe.returncode:
        reason = next((line for line in reversed(probe.stderr.splitlines()) if line.strip()), "no reason given")
        raise BadInput(f"cannot connect to a Ray cluster at {address} ({reason.strip()[:200]}); check the address, or "
                       "start one here with `ray start --head` and pass --ray auto")
    ray.init(address=address, **quiet)
    return ray


def default_results(manifest: Path, shard: tuple[int, int] | None) -> Path:
    """Beside the manifest; each shard of a job array its own file."""
    name = "results.jsonl" if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"
    return Path(manifest).parent / name


def check_results_path(path: Path) -> Path:
    if not Path(path).parent.resolve().is_dir():
        raise BadInput(f"the folder for the results file {path} does not exist; create it or pass another --results")
    return Path(path)


class ResultsFile:
    """results.jsonl, one line per job written whole as the job finishes: a run stopped half-way still lists what
    it finished."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "w")
        except OSError as error:
            raise BadInput(f"cannot write the results file {path} ({error.strerror or error}); "
                           "pass another --results") from None

    def write(self, line: dict) -> None:
        self._file.write(json.dumps(line, sort_keys=True, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
