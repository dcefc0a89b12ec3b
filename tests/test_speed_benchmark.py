"""The speed benchmark (`python -m benchmarks.speed`) in CI size: the demo model, two steps.

A test never asserts a timing: it asserts that every figure the README quotes is measured and reported."""

import json

import pytest
from click.testing import CliRunner

from benchmarks.speed import bench_command
from benchmarks.speed_runner import PHASES, verdicts

pytestmark = pytest.mark.slow


def run_bench(*args):
    return CliRunner().invoke(bench_command, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    result = run_bench("--model", "demo", "--steps", 2, "--device", "cpu", "--workdir", workdir, "--json",
                     "-o", workdir / "report.json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((workdir / "report.json").read_text())
    return printed


def test_every_phase_is_timed(report):
    (case,) = report["cases"]
    assert set(PHASES) | {"total"} <= set(case["phases"])
    assert all(seconds >= 0 for seconds in case["phases"].values())
    assert case["steps"] == 2 and len(case["loop"]["step_seconds"]) == 2


def test_loop_is_compared_with_its_floor(report):
    (case,) = report["cases"]
    assert case["floor"]["seconds"] > 0 and case["ratio"] > 0 and case["steady_ratio"] > 0
    assert len(case["floor"]["each_step"]) == 2 and case["best_step_ratio"] > 0
    assert case["ratio"] == pytest.approx(case["loop"]["seconds"] / case["floor"]["seconds"])


def test_memory_and_the_whole_cli_run_are_reported(report):
    (case,) = report["cases"]
    assert case["memory"]["peak_rss_mb"] > 0
    assert case["memory"]["cuda_peak_allocated_mb"] is None  # CPU run
    assert case["cli"]["wall_s"] > 0 and case["cli"]["peak_rss_mb"] > 0
    assert set(PHASES) <= set(case["cli"]["phases"])
    assert case["cli"]["import_floor_s"] > 0
    assert case["cli"]["over_import_floor_s"] == pytest.approx(case["cli"]["wall_s"] - case["cli"]["import_floor_s"])


def test_interpreter_costs_and_targets_are_judged(report):
    costs = report["interpreter"]
    assert costs["help_s"] and costs["usage_error_s"]
    judged = {verdict["target"] for verdict in report["targets"]}
    assert {"--help answers", "argument error answers"} <= judged
    assert any(name.startswith("loop / floor") for name in judged)
    assert report["machine"]["cpu_count"] and report["machine"]["load_average"]


def test_gpu_targets_are_judged_from_their_figures():
    """The GPU targets cannot run here; the judging of a GPU report is checked on a made-up one."""
    case = {"case": {"model": "sd1", "resolution": None, "steps": None}, "resolution": 512, "device": "cuda",
            "family": "sd1", "ratio": 1.1, "phases": {"train": 1.5},
            "memory": {"cuda_peak_allocated_mb": 7 * 1024}, "cli": {"wall_s": 11.0},
            "cli_runs": [{"wall_s": 11.0, "import_floor_s": 7.0, "over_import_floor_s": 4.0},
                         {"wall_s": 9.0, "import_floor_s": 6.0, "over_import_floor_s": 3.0}]}
    report = {"interpreter": {"help_s": [0.3], "usage_error_s": [0.3]}, "cases": [case]}
    met = {verdict["target"]: verdict["met"] for verdict in verdicts(report)}
    assert met == {"--help answers": True, "argument error answers": True, "loop / floor, sd1 @ 512 on cuda": True,
                   "training loop, sd1 @ 512 on cuda": True, "whole CLI run, sd1 @ 512 on cuda": True,
                   "peak GPU memory, sd1 @ 512 on cuda": False}


def test_unknown_model_is_a_usage_error(tmp_path):
    result = run_bench("--model", tmp_path / "nowhere", "--workdir", tmp_path)
    assert result.exit_code == 2
    assert "not demo, sd1, sd2, sdxl or a diffusers pipeline folder" in result.output


def test_the_demo_target_compares_each_cli_run_with_the_import_floor_beside_it():
    runs = [{"wall_s": w, "import_floor_s": f, "over_import_floor_s": w - f} for w, f in ((9, 8), (12, 10), (20, 15))]
    case = {"case": {"model": "demo", "resolution": None, "steps": None}, "resolution": 16, "device": "cpu",
            "family": "sd1", "ratio": 1.3, "cli": runs[0], "cli_runs": runs}
    report = {"interpreter": {"help_s": [0.3], "usage_error_s": [0.3]}, "cases": [case]}
    (demo,) = [v for v in verdicts(report) if v["target"].startswith("demo CLI erase")]
    assert demo["value"] == 2 and demo["met"]


def test_bare_cases_erase_with_the_published_method_alone(tmp_path):
    from benchmarks.speed_runner import Case, erase_command

    bare = erase_command(Case("demo", bare=True), tmp_path, tmp_path / "pictures", tmp_path / "out", "cpu", "auto")
    default = erase_command(Case("demo"), tmp_path, tmp_path / "pictures", tmp_path / "out", "cpu", "auto")
    assert "--no-preserve" in bare and bare[bare.index("--until") + 1] == "steps" and bare[bare.index("--epochs") + 1] == "4"
    assert "--no-preserve" not in default and "--until" not in default and "--epochs" not in default
    assert Case("demo", bare=True).label == "demo @ default bare"
