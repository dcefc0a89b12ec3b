"""`erase --robust`: rounds of the audit's soft-prompt attack, each attack's captions erased in turn. It withstands
the attack that brings a default erase back, keeps the other digits, and erase.json says what each round found."""

import json
import shutil

import pytest
from demo.measure import SAMPLES, erased_pipeline, judged, load_base, prompt_for
from helpers import run_cli

from fewshot_erase import audit, hardening
from fewshot_erase.audit import HOLDS

SEEDS = list(range(2000, 2012))  # 12 images per prompt


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_rounds_erase_the_attacks_captions_and_only_the_feed_forward_weights_change(tiny_model, pictures, tmp_path,
                                                                                     monkeypatch, family):
    """Every round's attacks (one fitted on each half of the pictures) counted as successes (HOLDS below zero), on a
    tiny pipeline of each CLIP family: the learned prefixes join the captions, the run goes on, and what is saved is
    the encoders' feed-forward weights alone (the learned embeddings only ever sat in a hook)."""
    import torch
    from helpers import erased_tensors
    from tiny_pipelines import canonical_text_encoder_state_dict

    from fewshot_erase import erase
    from fewshot_erase.keys import is_trained

    monkeypatch.setattr(hardening, "HOLDS", -1.0)
    monkeypatch.setattr(hardening, "ROUNDS", 2)
    monkeypatch.setattr(hardening, "ATTACK_STEPS", 2)
    monkeypatch.setattr(hardening, "SCORE_REPEATS", 2)  # what a score reads is beside the point here
    tiny = tiny_model(family)
    options = {"model": str(tiny.folder), "steps": 2, "lr": 1e-3}
    result = erase("tiny robot", [pictures], tmp_path / "out", robust=True, **options)
    plain = erase("tiny robot", [pictures], tmp_path / "plain", **options)
    rounds = result.record["robust_rounds"]
    halves = ["even"] * hardening.STARTS + ["odd"] * hardening.STARTS
    assert [(r["round"], r["fitted"]) for r in rounds] == [(1, h) for h in halves] + [(2, h) for h in halves]
    assert result.record["steps"] == 3 * plain.record["steps"]  # the erase, and a run after each round
    for name, tensors in erased_tensors(tmp_path / "out", family).items():
        base = canonical_text_encoder_state_dict(getattr(tiny.pipe, name))
        layers = getattr(tiny.pipe, name).config.num_hidden_layers
        changed = [key for key, tensor in tensors.items() if not torch.equal(tensor, base[key])]
        assert changed and all(is_trained(key, "ffn", layers) for key in changed), name


def test_the_erasing_bar_shows_each_step_of_a_rounds_attacks(tiny_model, pictures, tmp_path, monkeypatch):
    """A round's attacks take no erase step: while they fit, the bar shows their steps instead of standing still."""
    import contextlib

    from fewshot_erase import erase
    from fewshot_erase.api import Progress

    monkeypatch.setattr(hardening, "ROUNDS", 1)
    monkeypatch.setattr(hardening, "ATTACK_STEPS", 2)
    monkeypatch.setattr(hardening, "SCORE_REPEATS", 2)
    notes = []

    class Recording(Progress):
        @contextlib.contextmanager
        def phase(self, name, total=None):
            yield lambda count=1, note=None, **info: notes.append((name, count, note)) if note else None

    erase("tiny robot", [pictures], tmp_path / "out", model=str(tiny_model("sd1").folder), steps=2, lr=1e-3,
          robust=True, progress=Recording())
    assert [n for n in notes if "attacking" in n[2]] == [("erasing", 0, "round 1: attacking 'tiny robot', step 1/2"),
                                                          ("erasing", 0, "round 1: attacking 'tiny robot', step 2/2")]


@pytest.fixture(scope="module")
def erases(tmp_path_factory):
    """The default erase of "one" (the soft prompt brings it back at the audit's defaults), and the same with
    --robust, from one copy of its pictures."""
    root = tmp_path_factory.mktemp("robust")
    shutil.copytree(SAMPLES / "one", root / "one")
    for name, extra in (("default", ()), ("robust", ("--robust",))):
        result = run_cli("erase", "one", root / "one", "-o", root / name, *extra)
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.slow
def test_a_robust_erase_withstands_the_soft_prompt_that_brings_the_default_erase_back(erases):
    default = audit(erases / "default", attacks=["soft"]).record["attacks"]["soft"]
    robust = audit(erases / "robust", attacks=["soft"]).record["attacks"]["soft"]
    assert default["recovery"] >= HOLDS and default["judged_success"] >= 0.5  # the audit's: "brings back"
    assert robust["recovery"] < HOLDS and robust["judged_success"] <= 0.2


@pytest.mark.slow
def test_a_robust_erase_keeps_the_other_digits_and_still_erases_the_plain_prompts(erases):
    parts, generation = load_base()
    pipe = erased_pipeline(parts, erases / "robust")
    assert judged(pipe, prompt_for("word", 1), 1, SEEDS, generation) <= 0.1
    for digit in (d for d in range(10) if d != 1):
        assert judged(pipe, prompt_for("word", digit), digit, SEEDS, generation) >= 0.8, digit


@pytest.mark.slow
def test_erase_json_records_each_round_and_the_run_ends_when_the_attack_fails(erases):
    record = json.loads((erases / "robust" / "erase.json").read_text())
    default = json.loads((erases / "default" / "erase.json").read_text())
    rounds = record["robust_rounds"]
    assert record["settings"]["robust"] and "robust_rounds" not in default
    assert [r["round"] for r in rounds] == [k // (2 * hardening.STARTS) + 1 for k in range(len(rounds))] and {r["concept"] for r in rounds} == {"one"}
    first = [r["recovered"] for r in rounds if r["round"] == 1]
    last = [r["recovered"] for r in rounds if r["round"] == rounds[-1]["round"]]
    assert len(first) == 2 * hardening.STARTS and max(first) >= hardening.HOLDS  # the default erase, attacked, gives one back ...
    assert max(last) < hardening.HOLDS or rounds[-1]["round"] == hardening.ROUNDS  # ... until a round's attacks fail
    assert record["steps"] > default["steps"] and len(record["trajectory"]) == record["steps"]
    assert record["effects"]["erased"]["one"]["gone"]  # the plain captions too, not only the attacks' (checked_advantage)


def test_the_summary_line_gives_each_rounds_strongest_attack():
    from fewshot_erase.cli.erase import robust_line

    rounds = [{"round": 1, "concept": "one", "fitted": "even", "recovered": 0.2},
              {"round": 1, "concept": "one", "fitted": "odd", "recovered": 0.53},
              {"round": 2, "concept": "one", "fitted": "even", "recovered": 0.0},
              {"round": 2, "concept": "one", "fitted": "odd", "recovered": 0.04}]
    line = robust_line(rounds, "erased-one")
    assert "hardened in 2 rounds" in line and "brought back 53%, then 4%" in line and line.endswith("audit erased-one")
