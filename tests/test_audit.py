"""`fewshot-erase audit`: attacks on an erase output, scored on held-out pictures without a classifier and judged by
the demo's; audit.json says everything; OUT's weights never change; bad input is refused in one line."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO, run_cli

from fewshot_erase import audit
from fewshot_erase.attacks import demo_phrasings, prompt_battery
from fewshot_erase.audit import ATTACKS, budgets, parse_budget, recovery, verdict
from fewshot_erase.errors import BadInput
from fewshot_erase.models import load_tokenizer

SAMPLES = REPO / "sample_images"
QUICK = ["--budget", "3", "--judge-images", "2"]  # every code path, a fraction of the default work


@pytest.fixture(scope="module")
def seven(tmp_path_factory) -> Path:
    """A default demo erase of seven (the README's), from a copy of its sample pictures."""
    from fewshot_erase import erase

    root = tmp_path_factory.mktemp("audit")
    shutil.copytree(SAMPLES / "seven", root / "seven")
    erase("seven", [root / "seven"], root / "erased", device="cpu")
    return root / "erased"


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(folder: Path) -> dict[str, str]:
    """Everything an erase wrote: what the audit must leave as it was."""
    return {name: sha for name, sha in digest(folder).items() if name != "audit.json"}


@pytest.fixture(scope="module")
def audited(seven):
    """One quick audit with every attack, through the CLI with --json: its result, and OUT before and after."""
    before = weights(seven)
    result = run_cli("audit", seven, *QUICK, "--json")
    return result, before, weights(seven), json.loads((seven / "audit.json").read_text())


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> Path:
    """A default demo erase of six: one the soft prompt brings back at the audit's defaults (docs/audit.md)."""
    from fewshot_erase import erase

    root = tmp_path_factory.mktemp("audit-six")
    erase("six", [SAMPLES / "six"], root / "erased", device="cpu")
    return root / "erased"


def test_the_soft_prompt_brings_a_default_erase_back_and_the_judge_agrees(six):
    record = audit(six, attacks=["soft"], seed=0).record
    soft, plain = record["attacks"]["soft"], record["erased_captions"]
    assert soft["recovery"] > 0.3 and soft["budget"] == 64  # the default budget, on held-out pictures
    assert plain["original_judged_success"] >= 0.8 and plain["judged_success"] <= 0.2  # the erase worked ...
    assert soft["judged_success"] >= plain["judged_success"] + 0.5  # ... and the judge sees the concept back
    assert "the soft prompt brings back" in record["verdict"]


def test_the_hard_prompt_is_printed_and_tokenizes_back_to_the_ids_found(seven):
    result = run_cli("audit", seven, "--attack", "hard", "--budget", "8", "--judge-images", "1")
    assert result.exit_code == 0, result.output
    hard = json.loads((seven / "audit.json").read_text())["attacks"]["hard"]
    assert load_tokenizer()(hard["prompt"], add_special_tokens=False).input_ids == hard["token_ids"]
    assert len(hard["token_ids"]) == 3 and f"the hard prompt: {hard['prompt']!r}" in result.stdout


def test_the_hard_prompts_words_are_the_whole_words_that_tokenize_alone_to_themselves():
    from fewshot_erase.attacks import word_tokens

    tokenizer = load_tokenizer()
    vocabulary = tokenizer.get_vocab()
    candidates = [t[:-4] for t in vocabulary if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalnum()]
    alone = tokenizer(candidates, add_special_tokens=False).input_ids  # each word tokenized by itself
    expected = sorted(vocabulary[w + "</w>"] for w, ids in zip(candidates, alone) if ids == [vocabulary[w + "</w>"]])
    assert word_tokens(tokenizer).tolist() == expected and len(expected) < len(candidates)


def test_every_attack_runs_through_both_of_sdxls_text_encoders(erased):
    tiny, output = erased("sdxl")
    record = audit(output, budget=2, device="cpu").record
    assert record["model"] == str(tiny.folder) and record["settings"]["judge_images"] is None  # no judge for it
    assert {name: result["steps"] for name, result in record["attacks"].items()} == dict.fromkeys(ATTACKS, 2)
    assert load_tokenizer()(record["attacks"]["hard"]["prompt"], add_special_tokens=False).input_ids == \
        record["attacks"]["hard"]["token_ids"]


def test_json_prints_the_audit_record_and_nothing_else(audited):
    result, _, _, record = audited
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == record


def test_audit_json_records_every_attack_its_budget_recovery_and_the_settings(audited, seven):
    record = audited[3]
    assert record["format"] == "fewshot-erase-audit/1" and record["concept"] == "seven" and record["model"] == "demo"
    assert set(record["attacks"]) == set(ATTACKS)
    for name, result in record["attacks"].items():
        assert result["budget"] == 3 == record["settings"]["budgets"][name]
        assert result["recovery"] is None or 0.0 <= result["recovery"] <= 1.0
        assert {"loss", "steps", "seconds", "found", "judged_success"} <= set(result)
    assert record["attacks"]["prompts"]["prompt"] and record["attacks"]["hard"]["token_ids"]
    assert {"attacks", "budgets", "seed", "score_seed", "score_repeats", "soft_tokens", "fit_repeats", "judge_images",
            "threads"} <= set(record["settings"])
    assert set(record["losses"]) == {"empty", "original", "erased"} and record["verdict"]
    pictures = record["pictures"]
    assert pictures["used_by_the_erase"] and pictures["fitted"] and pictures["held_out"]
    assert not set(pictures["fitted"]) & set(pictures["held_out"])  # never scored on what an attack fitted
    assert sorted(pictures["fitted"] + pictures["held_out"]) == sorted(p.name for p in (seven.parent / "seven").iterdir())


def test_the_audit_never_changes_the_erase_output(audited):
    _, before, after, _ = audited
    assert after == before and "model.safetensors" in after


def test_other_pictures_are_used_with_a_warning(seven):
    result = run_cli("audit", seven, SAMPLES / "one", "--attack", "prompts", *QUICK)
    assert result.exit_code == 0, result.output
    assert "warning: 6 of the 6 pictures are not ones the erase used" in result.stderr
    assert not json.loads((seven / "audit.json").read_text())["pictures"]["used_by_the_erase"]


def test_a_budget_larger_than_the_battery_shows_what_was_tried(seven):
    result = run_cli("audit", seven, "--attack", "prompts", "--budget", "100000", "--judge-images", "1")
    assert result.exit_code == 0, result.output
    tried = json.loads((seven / "audit.json").read_text())["attacks"]["prompts"]["steps"]
    assert tried < 100000 and f"{tried} of 100000" in result.stdout


def test_an_erase_of_several_concepts_is_audited_one_named_concept_at_a_time(tmp_path):
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    output = tmp_path / "two-seven"
    erase_concepts([ConceptSpec(d, (str(SAMPLES / d),)) for d in ("two", "seven")], output, device="cpu")
    unnamed = run_cli("audit", output, *QUICK)
    assert unnamed.exit_code == 2 and "removed 2 concepts (two, seven)" in unnamed.stderr
    assert unnamed.stderr.rstrip().endswith("name the one to audit with --concept")
    with pytest.raises(BadInput, match="name the one to audit with `concept`$"):  # the keyword, in Python
        audit(output, attacks=["prompts"], budget=2, judge_images=1)
    record = audit(output, concept="seven", attacks=["prompts"], budget=2, judge_images=1).record
    assert record["concept"] == "seven" and record["pictures"]["used_by_the_erase"]
    assert all(name.startswith("seven_") for name in record["pictures"]["fitted"] + record["pictures"]["held_out"])


def copy_with_record(seven: Path, tmp_path: Path, change) -> Path:
    """A copy of the erase output whose erase.json `change` rewrites (pictures moved, a model gone)."""
    copy = tmp_path / "copy"
    shutil.copytree(seven, copy)
    record = json.loads((copy / "erase.json").read_text())
    change(record, tmp_path)
    (copy / "erase.json").write_text(json.dumps(record))
    return copy


def changed_picture(record, tmp_path):
    shutil.copytree(Path(record["images_paths"][0]).parent, tmp_path / "pictures")
    record["images_paths"] = [str(tmp_path / "pictures" / Path(p).name) for p in record["images_paths"]]
    shutil.copy(SAMPLES / "one" / sorted(p.name for p in (SAMPLES / "one").iterdir() if p.suffix == ".png")[0],
                record["images_paths"][2])


def moved_pictures(record, tmp_path):
    record["images_paths"] = [str(tmp_path / "gone" / Path(p).name) for p in record["images_paths"]]


def model_gone(record, tmp_path):
    record["base"].update(kind="folder", model=str(tmp_path / "models" / "sd15"))


def settings_gone(record, tmp_path):
    record["settings"] = None


def concepts_gone(record, tmp_path):
    del record["concepts"]


def without_weights(folder: Path) -> Path:
    for weights in folder.rglob("model.safetensors"):
        weights.unlink()
    return folder


def truncated_weights(folder: Path) -> Path:
    for weights in folder.rglob("model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])
    return folder


BAD = {
    "not an erase output": (lambda seven, tmp: [tmp], "is not a fewshot-erase output"),
    "a picture changed": (lambda seven, tmp: [copy_with_record(seven, tmp, changed_picture)], "has changed since the erase"),
    "pictures moved": (lambda seven, tmp: [copy_with_record(seven, tmp, moved_pictures)], "pass them as IMAGES"),
    "budget 0": (lambda seven, tmp: [seven, "--budget", "0"], "--budget must be at least 1, got 0"),
    "budget negative": (lambda seven, tmp: [seven, "--budget", "-3"], "--budget must be at least 1, got -3"),
    "an attack's budget negative": (lambda seven, tmp: [seven, "--budget", "soft=-5"], "at least 1, got -5 for soft"),
    "budget not a count": (lambda seven, tmp: [seven, "--budget", "lots"], "is not a count"),
    "budget of no attack": (lambda seven, tmp: [seven, "--budget", "jailbreak=3"], "unknown attack 'jailbreak'"),
    "unknown attack": (lambda seven, tmp: [seven, "--attack", "jailbreak"], "unknown attack 'jailbreak'"),
    "model gone": (lambda seven, tmp: [copy_with_record(seven, tmp, model_gone)], "pass --model"),
    "record damaged": (lambda seven, tmp: [copy_with_record(seven, tmp, settings_gone)], "its 'settings' is malformed"),
    "record without concepts": (lambda seven, tmp: [copy_with_record(seven, tmp, concepts_gone)], "it has no 'concepts'"),
    "weights truncated": (lambda seven, tmp: [truncated_weights(copy_with_record(seven, tmp, lambda *_: None))], "truncated"),
    "weights gone": (lambda seven, tmp: [without_weights(copy_with_record(seven, tmp, lambda *_: None))],
                     "lacks its erased text_encoder"),
    "seed too large": (lambda seven, tmp: [seven, "--seed", str(2**70)], "--seed must be between 0 and 2**63 - 1"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_leaves_out_unchanged(seven, tmp_path, case):
    make, message = BAD[case]
    args = make(seven, tmp_path)
    before = digest(Path(args[0]))
    result = run_cli("audit", *args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert result.stdout == "" and digest(Path(args[0])) == before


def test_recovery_runs_from_the_empty_caption_to_the_original_and_is_clipped():
    assert recovery(empty=1.0, original=0.5, attacked=0.75) == 0.5
    assert recovery(1.0, 0.5, 1.2) == 0.0 and recovery(1.0, 0.5, 0.4) == 1.0
    assert recovery(1.0, 1.0, 0.5) is None  # the captions never helped: nothing to recover


def test_the_verdict_names_what_holds_and_what_brings_the_concept_back():
    results = {"prompts": {"recovery": 0.0}, "soft": {"recovery": 0.64}, "inversion": {"recovery": 0.1}}
    assert verdict(results) == "holds against rephrasing and textual inversion; the soft prompt brings back 64%"
    assert verdict({"soft": {"recovery": 0.1}}) == "holds against every attack tried (at most 10% back, by the soft prompt)"
    assert verdict({"soft": {"recovery": 0.9}, "hard": {"recovery": 0.3}}).startswith("does not hold: the soft prompt brings back 90%")


def test_budgets_default_per_attack_and_are_checked():
    assert budgets(("soft", "prompts"), None) == {"soft": 64, "prompts": 64}
    assert budgets(("soft", "hard"), parse_budget(["7", "hard=9"])) == {"soft": 7, "hard": 9}
    with pytest.raises(BadInput, match="at least 1"):
        budgets(("soft",), -1)


def test_the_prompt_battery_holds_the_users_then_the_erases_then_the_demos_phrasings():
    shipped = demo_phrasings("seven")
    assert "the numeral seven" in shipped and "the numeral 7" in shipped and "a handwritten 7" in shipped
    assert {"siete", "the number vii", "the days of a week"} <= set(shipped)  # the demo's implicit forms
    battery = prompt_battery("seven", ["a photo of the digit {}"], ["{} as a numeral", "lucky number"], shipped)
    assert battery[:3] == ("seven as a numeral", "lucky number", "a photo of the digit seven")
    assert len(battery) == len(set(battery)) and "a rendering of a seven" in battery
    assert not [p for p in demo_phrasings("Van Gogh") if "{" in p or "  " in p]


def test_without_scikit_learn_the_audit_scores_recovery_alone(monkeypatch):
    """A plain install has no scikit-learn (a test extra): the demo's judge is skipped, not a crash."""
    import importlib.util

    from fewshot_erase.audit import find_judge
    from fewshot_erase.models import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert find_judge(resolve_model(None), "seven") is None
