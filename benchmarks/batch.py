"""`fewshot-erase batch` on the demo: local and Ray wall times, Ray's cost per job, and what a kill costs a run.

    OMP_NUM_THREADS=1 python -m benchmarks.batch                       # 8 jobs, every scenario, 1 pass
    OMP_NUM_THREADS=1 python -m benchmarks.batch --jobs 8 --passes 2 --json benchmarks/results/batch.json

The manifest erases the sample digits one..eight (wrapping round for more jobs) from the embedded demo with its
own settings. Every timing is a whole `fewshot-erase batch` process (what a user waits for, a local Ray cluster's
start and stop included), from empty outputs unless the scenario says otherwise:

- local: one job after another in the process; ray-1 / ray-2: `--ray --workers 1|2`, a local cluster of 1 or 2 CPUs;
- rerun-local / rerun-ray-2: the same manifest again with every output there: only the skip checks run;
- kill-worker: `--ray --workers 2`, and once two jobs have finished, the Ray worker process running an erase is
  killed (SIGKILL); Ray reruns its task, and the rerun of the whole batch afterwards should redo nothing;
- kill-batch: `--ray --workers 2`, the batch process itself killed (SIGKILL) once two jobs have finished, as a lost
  node would; then the batch is run again and its results say how many jobs it redid and how many it skipped.

Per-job Ray overhead: with one worker the jobs run back to back, so the time between one job's line and the next
beyond the next job's own time in its worker (`seconds`) is what going through Ray adds to a job.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"
LINGER = 30.0  # seconds a killed batch's cluster processes are given to exit by themselves
WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")


def write_manifest(folder: Path, count: int) -> Path:
    jobs = [{"concept": WORDS[n % len(WORDS)], "images": str(SAMPLES / WORDS[n % len(WORDS)]), "seed": n // len(WORDS),
             "output": f"out/{n + 1:02d}-{WORDS[n % len(WORDS)]}"} for n in range(count)]
    (folder / "out").mkdir(parents=True, exist_ok=True)
    path = folder / "jobs.yaml"
    path.write_text(yaml.safe_dump({"jobs": jobs}, sort_keys=False))
    return path


def batch_process(manifest: Path, *arguments: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "fewshot_erase", "batch", str(manifest), *arguments, "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def lines_of(manifest: Path) -> list[dict]:
    path = manifest.parent / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (a local Ray cluster's raylet, GCS and workers are the batch process's)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def timed(manifest: Path, *arguments: str) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    process = batch_process(manifest, *arguments)
    _, stderr = process.communicate()
    return {**summary(time.perf_counter() - started, process.returncode, lines_of(manifest), stderr),
            "load_average_before": load}


def summary(wall: float, code: int, lines: list[dict], stderr: str = "") -> dict:
    statuses = [line["status"] for line in lines]
    return {"wall_s": wall, "exit_code": code, "jobs": len(lines),
            **{status: statuses.count(status) for status in ("done", "skipped", "failed")},
            "job_seconds": [line["seconds"] for line in sorted(lines, key=lambda line: line["job"])],
            "job_cpu_seconds": [line["cpu_seconds"] for line in sorted(lines, key=lambda line: line["job"])],
            "import_s": [line["erase"]["report"]["timings"]["import"] for line in lines
                         if line["erase"]["status"] == "done" and line["erase"]["report"]["timings"]["import"] > 0.5],
            "finished_at": sorted(line["finished_at"] for line in lines),
            "gaps_s": gaps(lines), "load_average": os.getloadavg()[0], "stderr": stderr.strip()[-500:]}


def gaps(lines: list[dict]) -> list[float]:
    """Time between consecutive job lines beyond the later job's own time in its worker."""
    ordered = sorted(lines, key=lambda line: line["finished_at"])
    return [later["finished_at"] - earlier["finished_at"] - later["seconds"]
            for earlier, later in zip(ordered, ordered[1:])]


def wait_for(manifest: Path, process: subprocess.Popen, finished: int, busy_in: str | None = None):
    """Poll until `finished` job lines are written and, with `busy_in`, a process below the batch has been seen
    running that task for a second since then: (that process's id, how long it was seen running it), or (None, 0).
    The time is a lower bound of the work a kill then loses: the task may have started before the lines were in."""
    seen: dict[int, float] = {}
    while process.poll() is None:
        if len(lines_of(manifest)) >= finished:
            if busy_in is None:
                return None, 0.0
            now = time.perf_counter()
            busy = {pid for pid in descendants(process.pid) if command_line(pid).startswith(busy_in)}
            seen = {pid: seen.get(pid, now) for pid in busy}  # a worker seen idle starts again
            ripe = [pid for pid in busy if now - seen[pid] >= 1.0]
            if ripe:
                return ripe[0], now - seen[ripe[0]]
        time.sleep(0.02)
    return None, 0.0


def complete_outputs(folder: Path) -> dict:
    """Each output there is whole (its record reads back); a killed erase leaves at most its hidden staging folder."""
    from fewshot_erase.outputs import read_record

    outputs = [path for path in (folder / "out").iterdir() if not path.name.startswith(".")]
    for output in outputs:
        read_record(output)
        assert (output / "model.safetensors").is_file(), output
    staging = [path for path in (folder / "out").iterdir() if ".partial-" in path.name]
    return {"outputs": len(outputs), "staging_left": len(staging)}


def kill_worker(folder: Path, count: int) -> dict:
    manifest = write_manifest(folder, count)
    started = time.perf_counter()
    process = batch_process(manifest, "--ray", "--workers", "2")
    victim, busy = wait_for(manifest, process, 2, busy_in="ray::erase_step")
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    killed_at = time.perf_counter() - started
    _, stderr = process.communicate()
    run = summary(time.perf_counter() - started, process.returncode, lines_of(manifest), stderr)
    run.update(killed_worker=victim, killed_at_s=killed_at, lost_work_at_least_s=busy, state=complete_outputs(folder))
    run["rerun"] = timed(manifest, "--ray", "--workers", "2")
    return run


def kill_batch(folder: Path, count: int) -> dict:
    manifest = write_manifest(folder, count)
    started = time.perf_counter()
    process = batch_process(manifest, "--ray", "--workers", "2")
    wait_for(manifest, process, 2)
    below = descendants(process.pid)
    process.kill()
    process.communicate()
    killed_after = time.perf_counter() - started
    exits: dict[int, float] = {}
    deadline = time.perf_counter() + LINGER
    while time.perf_counter() < deadline and len(exits) < len(below):
        for pid in below:  # the cluster's processes notice that the batch that started them is gone
            if pid not in exits and not Path(f"/proc/{pid}").exists():
                exits[pid] = time.perf_counter() - started - killed_after
        time.sleep(0.1)
    left = [pid for pid in below if pid not in exits]
    lingering = sorted({command_line(pid).split(" ")[0] for pid in left})
    for pid in left:  # the benchmark's own processes, by id, so that the rerun starts on a quiet machine
        os.kill(pid, signal.SIGKILL)
    finished = len(lines_of(manifest))
    state = complete_outputs(folder)
    rerun = timed(manifest, "--ray", "--workers", "2")
    return {"killed_after_s": killed_after, "cluster_processes": len(below),
            "exited_within_s": max(exits.values(), default=0.0), "exited": len(exits),
            "lines_before_kill": finished, "processes_left_after_wait": len(left), "left": lingering,
            "state_after_kill": state, "rerun": rerun}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--passes", type=int, default=1, help="each timed scenario this many times, order alternating")
    parser.add_argument("--json", default="benchmarks/results/batch.json")
    args = parser.parse_args(argv)

    scenarios = {"local": (), "ray-1": ("--ray", "--workers", "1"), "ray-2": ("--ray", "--workers", "2")}
    runs: dict[str, list[dict]] = {name: [] for name in [*scenarios, "rerun-local", "rerun-ray-2"]}
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        for index in range(args.passes):
            for name in scenarios if index % 2 == 0 else list(scenarios)[::-1]:
                folder = workdir / f"{name}-{index}"
                manifest = write_manifest(folder, args.jobs)
                runs[name].append(timed(manifest, *scenarios[name]))
                print(f"{name}: {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr)
                if name == "ray-2":
                    runs["rerun-ray-2"].append(timed(manifest, *scenarios[name]))
                    runs["rerun-local"].append(timed(manifest))
        killed_worker = kill_worker(workdir / "kill-worker", args.jobs)
        print(f"kill-worker: {killed_worker['wall_s']:.1f} s", file=sys.stderr)
        killed_batch = kill_batch(workdir / "kill-batch", args.jobs)
        print(f"kill-batch: rerun {killed_batch['rerun']['wall_s']:.1f} s", file=sys.stderr)

    medians = {name: statistics.median(run["wall_s"] for run in values) for name, values in runs.items()}
    ray_one_gaps = [gap for run in runs["ray-1"] for gap in run["gaps_s"]]
    local_gaps = [gap for run in runs["local"] for gap in run["gaps_s"]]
    later_jobs = [seconds for run in runs["local"] for seconds in run["job_seconds"][1:]]
    later_cpu = [seconds for run in runs["local"] for seconds in run["job_cpu_seconds"][1:]]
    result = {
        "jobs": args.jobs, "passes": args.passes, "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "median_wall_s": medians,
        "speedup_ray_2_over_ray_1": medians["ray-1"] / medians["ray-2"],
        "per_job_s_local_after_the_first": statistics.median(later_jobs),
        "per_job_cpu_s_local_after_the_first": statistics.median(later_cpu),
        "first_job_s_local": statistics.median(run["job_seconds"][0] for run in runs["local"]),
        "cpu_s_per_run": {name: statistics.median(sum(run["job_cpu_seconds"]) for run in values)
                          for name, values in runs.items()},
        "gap_between_jobs_s": {"local": statistics.median(local_gaps), "ray-1": statistics.median(ray_one_gaps)},
        "ray_overhead_per_job_s": statistics.median(ray_one_gaps) - statistics.median(local_gaps),
        "ray_fixed_s": medians["rerun-ray-2"] - medians["rerun-local"],
        "kill_worker": killed_worker, "kill_batch": killed_batch, "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key not in ("runs", "kill_worker", "kill_batch")},
                     indent=2))
    return result


if __name__ == "__main__":
    main()
