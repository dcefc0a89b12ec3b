"""`fewshot-erase batch`: a manifest of jobs run here or on a local Ray cluster gives each job's output exactly as
`erase` alone would; a bad job fails alone; a rerun skips what is done; the shards of a job array cover the manifest
once; bad input is one line, exit 2, and nothing run."""

import json
import socket
from pathlib import Path

import pytest
import yaml

from conftest import erased_output, write_pictures
from fewshot_erase import erase
from fewshot_erase.apply import apply
from fewshot_erase.batch import differences
from fewshot_erase.batch_manifest import read_jobs, shard
from fewshot_erase.export import export
from fewshot_erase.outputs import read_record
from helpers import run_cli, run_cli_process

TINY = {"steps": 2, "lr": 1e-3}  # as conftest's erased_output, so its output is the reference


def write_manifest(folder: Path, jobs: list[dict], name: str = "jobs.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump({"defaults": TINY, "jobs": jobs}, sort_keys=False))
    return path


def three_jobs(tiny, pictures, folder: Path) -> Path:
    """The reference erase with an export, a second concept and seed applied to a checkpoint, and a job whose
    picture folder is missing."""
    write_pictures(folder / "other", seed=5)
    return write_manifest(folder, [
        {"name": "robot", "model": str(tiny.folder), "concept": "tiny robot", "images": str(pictures),
         "output": "out/robot", "export": {"format": "delta", "output": "out/robot-delta.safetensors"}},
        {"model": str(tiny.folder), "concept": "tiny cat", "images": "other", "seed": 1, "output": "out/cat",
         "apply": {"checkpoint": str(tiny.single_file), "output": "out/cat.safetensors"}},
        {"model": str(tiny.folder), "concept": "tiny dog", "images": "no-such-folder", "output": "out/dog"},
    ])


def results(folder: Path, name: str = "results.jsonl") -> dict[int, dict]:
    return {line["job"]: line for line in map(json.loads, (folder / name).read_text().splitlines())}


def same_files(one: Path, other: Path, names=("model.safetensors", "config.json")) -> bool:
    return all((one / name).read_bytes() == (other / name).read_bytes() for name in names)


def check_outputs(tiny, pictures, folder: Path, tmp_path: Path) -> None:
    """Each job's files are the bytes `erase`, `export` and `apply` write for it alone."""
    out = folder / "out"
    assert same_files(out / "robot", erased_output(tiny, pictures))
    alone = tmp_path / "alone"
    erase("tiny cat", [folder / "other"], alone, model=str(tiny.folder), seed=1, **TINY)
    assert same_files(out / "cat", alone)
    apply(alone, tiny.single_file, tmp_path / "cat.safetensors")
    assert (out / "cat.safetensors").read_bytes() == (tmp_path / "cat.safetensors").read_bytes()
    export(erased_output(tiny, pictures), "delta", tmp_path / "delta.safetensors")
    assert (out / "robot-delta.safetensors").read_bytes() == (tmp_path / "delta.safetensors").read_bytes()
    assert not (out / "dog").exists()


def check_lines(folder: Path) -> None:
    lines = results(folder)
    assert [lines[n]["status"] for n in (1, 2, 3)] == ["done", "done", "failed"]
    assert "no-such-folder does not exist" in lines[3]["error"] and "\n" not in lines[3]["error"]
    assert lines[1]["follow_ups"][0]["status"] == "done" and lines[1]["erase"]["report"]["steps"] == 2
    assert lines[2]["follow_ups"][0]["kind"] == "apply" and lines[2]["follow_ups"][0]["status"] == "done"


@pytest.fixture(scope="module")
def local_run(tiny_model, pictures, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    manifest = three_jobs(tiny_model("sd1"), pictures, folder)  # out/ is not there: the batch makes it
    return folder, manifest, run_cli("batch", manifest)


def test_local_run_writes_what_erase_alone_writes_and_a_bad_job_fails_alone(local_run, tiny_model, pictures, tmp_path):
    folder, _, result = local_run
    assert result.exit_code == 1, result.stderr
    assert "failed: job 3 (line" in result.stderr and "no-such-folder" in result.stderr
    check_lines(folder)
    check_outputs(tiny_model("sd1"), pictures, folder, tmp_path)
    # two steps erase nothing: the summary says which jobs ran without erasing, as each job's verdicts do
    for job, concept in ((1, "tiny robot"), (2, "tiny cat")):
        said = results(folder)[job]["erase"]["report"]["effects"]["erased"][concept]["verdict"]
        assert (f"not erased: job {job} (line" in result.stderr) is (said == "not erased")
    assert "not erased: job 1 (line" in result.stderr and "'tiny robot' is not erased" in result.stderr


def test_rerun_skips_finished_jobs(local_run):
    folder, manifest, _ = local_run
    before = {path: path.stat().st_mtime_ns for path in (folder / "out").rglob("*")}
    result = run_cli("batch", manifest)
    lines = results(folder)
    assert result.exit_code == 1
    assert [lines[n]["status"] for n in (1, 2, 3)] == ["skipped", "skipped", "failed"]
    assert lines[1]["follow_ups"][0]["status"] == "skipped" and lines[1]["erase"]["report"]["steps"] == 2
    assert {path: path.stat().st_mtime_ns for path in (folder / "out").rglob("*")} == before


def test_an_output_of_another_erase_is_kept_unless_overwrite(tiny_model, pictures, tmp_path):
    """A changed setting means the output is not the job's any more: the job fails, naming the difference, until
    --overwrite replaces it."""
    job = {"model": str(tiny_model("sd1").folder), "concept": "tiny robot", "images": str(pictures), "output": "out"}
    run_cli("batch", write_manifest(tmp_path, [job]))
    changed = write_manifest(tmp_path, [{**job, "seed": 3}])
    result = run_cli("batch", changed)
    assert result.exit_code == 1 and "is not this job's erase (seed 0, the job's is 3)" in results(tmp_path)[1]["error"]
    assert run_cli("batch", changed, "--overwrite").exit_code == 0
    assert read_record(tmp_path / "out")["settings"]["seed"] == 3


def test_the_record_rule(tiny_model, pictures, tmp_path):
    """Done means: the same concepts, pictures (by content), base model and chosen settings."""
    tiny = tiny_model("sd1")
    record = read_record(erased_output(tiny, pictures))
    base = {"model": str(tiny.folder), "concept": "tiny robot", "images": str(pictures), "output": "out"}

    def found(**changes):
        return differences(read_jobs(write_manifest(tmp_path, [{**base, **changes}]))[0], record)

    assert found() == []
    assert found(lr=1e-4)[0].startswith("lr 0.001, the job's is 0.0001")
    assert found(concept="tiny cat")[0].startswith("concepts")
    assert found(model=str(tiny_model("sd2").folder))[0].startswith("base model")
    assert found(images=str(write_pictures(tmp_path / "others", seed=9)))[0].startswith("other pictures")
    assert found(train="all")[0].startswith("train 'ffn', the job's is 'all'")  # a default left out is a default


def test_defaults_paths_and_the_three_ways_to_name_concepts(tmp_path):
    (tmp_path / "models" / "local").mkdir(parents=True)
    (tmp_path / "two.json").write_text(json.dumps([{"concept": "a", "images": "pa"}, {"concept": "b", "images": "pb"}]))
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"concept": "seven", "images": "sevens", "steps": 3, "model": "org/sd"},
                                    "jobs": [{"output": "o1", "seed": 2},
                                             {"output": "o2", "concepts": "two.json", "model": "models/local"},
                                             {"output": "o3", "concepts": [{"concept": " x  y ", "images": ["i.png"]}]}]}))
    first, second, third = read_jobs(path)
    assert [spec.concept for spec in first.specs] == ["seven"] and first.specs[0].images == (str(tmp_path / "sevens"),)
    assert first.settings == {"steps": 3, "seed": 2} and first.model == "org/sd"  # a Hub id
    assert [spec.images for spec in second.specs] == [(str(tmp_path / "pa"),), (str(tmp_path / "pb"),)]
    assert second.model == str(tmp_path / "models/local")  # there beside the manifest: a path, not a Hub id
    assert third.specs[0].concept == "x y" and third.output == tmp_path / "o3" and third.name == "o3"


def test_shards_cover_the_manifest_once(local_run, tmp_path):
    eleven = [{"concept": f"c{n}", "images": "x", "output": f"o{n}"} for n in range(11)]
    jobs = read_jobs(write_manifest(tmp_path, eleven))
    for count in (1, 2, 3, 11, 12):
        slices = [[job.number for job in shard(jobs, index, count)] for index in range(1, count + 1)]
        assert sorted(sum(slices, [])) == list(range(1, 12))
    folder, manifest, _ = local_run
    for index in (1, 2):
        run_cli("batch", manifest, "--shard", f"{index}/2")
    sliced = [set(results(folder, f"results.shard-{index}-of-2.jsonl")) for index in (1, 2)]
    assert sliced[0] | sliced[1] == {1, 2, 3} and not sliced[0] & sliced[1]


@pytest.fixture(scope="module")
def ray_run(tiny_model, pictures, tmp_path_factory):
    pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("ray")
    manifest = three_jobs(tiny_model("sd1"), pictures, folder)
    (folder / "out").mkdir()
    return folder, manifest, run_cli_process("batch", manifest, "--ray", "--workers", "2", "-q", timeout=300)


def test_ray_run_writes_what_erase_alone_writes_and_a_bad_job_fails_alone(ray_run, tiny_model, pictures, tmp_path):
    """(A rerun's skips are the same batch.run_job on either engine: the local run's test above reruns.)"""
    folder, _, result = ray_run
    assert result.returncode == 1, result.stderr
    check_lines(folder)
    check_outputs(tiny_model("sd1"), pictures, folder, tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


GOOD = {"concept": "seven", "images": "pictures", "output": "out/seven"}


@pytest.mark.parametrize("manifest, arguments, message", [
    ("jobs:\n  - concept: seven\n    images: [pictures\n", [], "is not valid YAML (line 4"),
    ('{"concept": "seven", "images": "pictures", "output": "a"}\n{"concept": "six",\n', [], "line 2: not valid JSON"),
    ({"jobs": [GOOD, {**GOOD, "output": "b", "colour": 1}]}, [], "line 8 (job 2): unknown field 'colour'"),
    ({"jobs": [{"images": "pictures", "output": "a"}]}, [], "(job 1): no concept"),
    ({"jobs": [{"concept": "seven", "output": "a"}]}, [], "(job 1): concept without 'images'"),
    ({"jobs": [GOOD, {**GOOD, "concept": "six"}]}, [], "is also written by line 2 (job 1)"),
    ({"jobs": [GOOD, {**GOOD, "output": "pictures/six"}]}, [], "pictures/six is inside"),
    ({"jobs": [GOOD, {"concept": "six", "images": "out/seven/x", "output": "b"}]}, [], "inside"),
    ({"jobs": [{**GOOD, "lr": "fast"}]}, [], "field 'lr': must be a number"),
    ({"jobs": [{**GOOD, "export": {"format": "zip", "output": "e.safetensors"}}]}, [], "field 'format': unknown"),
    ({"jobs": [{**GOOD, "export": {"format": "delta", "output": "e.safetensors", "rank": 4}}]}, [], "sets a LoRA's rank"),
    ({"jobs": [{**GOOD, "apply": {"checkpoint": "model.safetensors", "output": "grid.png"}}]}, [],
     "field 'output': grid.png must end in .safetensors: a single-file checkpoint"),
    ({"jobs": [{**GOOD, "apply": {"checkpoint": "pictures", "output": "patched.safetensors"}}]}, [],
     "patched.safetensors must not end in .safetensors: a pipeline folder"),
    ({"jobs": [{**GOOD, "lr": float("inf")}]}, [], "--lr must be a finite positive number"),
    ({"jobs": [{**GOOD, "steps": 5, "epochs": 2}]}, [], "field 'epochs': steps and epochs both set the run's length"),
    ({"jobs": [{**GOOD, "seed": 2**70}]}, [], "--seed must be between 0 and 2**63 - 1"),
    ({"jobs": [{**GOOD, "preserve": [" "]}]}, [], "the concept to preserve is empty"),
    ({"jobs": [GOOD]}, ["--shard", "3/2"], "--shard 3/2 is out of range"),
    ({"jobs": [GOOD]}, ["--shard", "0/2"], "--shard 0/2 is out of range"),
    ({"jobs": [GOOD]}, ["--ray", f"127.0.0.1:{free_port()}", "--ray-timeout", "2"], "did not answer within 2 s"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_run(tmp_path, manifest, arguments, message):
    if "--ray" in arguments:
        pytest.importorskip("ray")
    write_pictures(tmp_path / "pictures")
    if isinstance(manifest, dict):
        path = tmp_path / "jobs.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    else:
        path = tmp_path / ("jobs.jsonl" if manifest.startswith("{") else "jobs.yaml")
        path.write_text(manifest)
    result = run_cli("batch", path, *arguments)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("results*"))


def test_consecutive_jobs_on_one_model_load_it_once(tiny_model, pictures, tmp_path, monkeypatch):
    """The second job reuses the first one's pipeline, put back to its original text encoders: its files are still
    the bytes an erase alone writes (as the local run above checks)."""
    from fewshot_erase import batch, models

    loads, load = [], models.load_pipeline_parts
    monkeypatch.setattr(models, "load_pipeline_parts", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))
    monkeypatch.setattr(batch, "_KEPT", [])  # a fresh worker
    tiny = tiny_model("sd1")
    folder = tmp_path / "run"
    manifest = three_jobs(tiny, pictures, folder)
    (folder / "out").mkdir()
    result = run_cli("batch", manifest)
    assert result.exit_code == 1 and len(loads) == 1  # jobs 1 and 2 erased from one load; job 3 fails before loading
    check_outputs(tiny, pictures, folder, tmp_path)


def test_a_job_makes_the_folders_its_output_goes_in_and_a_failed_one_leaves_none(tmp_path):
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(yaml.safe_dump({"jobs": [{"concept": "seven", "images": "no-such-folder", "output": "new/deeper/seven"}]}))
    result = run_cli("batch", manifest)
    assert result.exit_code == 1 and "no-such-folder does not exist" in result.output
    assert not (tmp_path / "new").exists()

