"""`erase --robust`: rounds of the audit's soft-prompt attack, each attack's captions erased in turn. It withstands
the attack that brings a default erase back, keeps the other digits, and erase.json says what each round found."""

import json
import shutil

import pytest
from demo.measure import SAMPLES, erased_pipeline, judged, load_base, prompt_for
from helpers import run_cli

from fewshot_erase import audit, hardening

pytestmark = pytest.mark.slow

SEEDS = list(range(2000, 2012))  # 12 images per prompt


@pytest.fixture(scope="module")
def erases(tmp_path_factory):
    """The README's erase of seven, and the same with --robust, from one copy of its pictures."""
    root = tmp_path_factory.mktemp("robust")
    shutil.copytree(SAMPLES / "seven", root / "seven")
    for name, extra in (("default", ()), ("robust", ("--robust",))):
        result = run_cli("erase", "seven", root / "seven", "-o", root / name, *extra)
        assert result.exit_code == 0, result.output
    return root


def test_a_robust_erase_withstands_the_soft_prompt_that_brings_the_default_erase_back(erases):
    default = audit(erases / "default", attacks=["soft"]).record["attacks"]["soft"]
    robust = audit(erases / "robust", attacks=["soft"]).record["attacks"]["soft"]
    assert default["recovery"] >= hardening.HOLDS and default["judged_success"] >= 0.5
    assert robust["recovery"] < hardening.HOLDS and robust["judged_success"] <= 0.2


def test_a_robust_erase_keeps_the_other_digits_and_still_erases_the_plain_prompts(erases):
    parts, generation = load_base()
    pipe = erased_pipeline(parts, erases / "robust")
    assert judged(pipe, prompt_for("word", 7), 7, SEEDS, generation) <= 0.1
    for digit in (d for d in range(10) if d != 7):
        assert judged(pipe, prompt_for("word", digit), digit, SEEDS, generation) >= 0.8, digit


def test_erase_json_records_each_round_and_the_run_ends_when_the_attack_fails(erases):
    record = json.loads((erases / "robust" / "erase.json").read_text())
    default = json.loads((erases / "default" / "erase.json").read_text())
    rounds = record["robust_rounds"]
    assert record["settings"]["robust"] and "robust_rounds" not in default
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1)) and {r["concept"] for r in rounds} == {"seven"}
    assert rounds[0]["recovered"] >= hardening.HOLDS  # the default erase, attacked, gives seven back ...
    assert rounds[-1]["recovered"] < hardening.HOLDS or len(rounds) == hardening.ROUNDS  # ... until an attack fails
    assert record["steps"] > default["steps"] and len(record["trajectory"]) == record["steps"]
