"""`compare`: the base and the erased encoder side by side, on the prompts a user would look at first."""

import json


def test_compare_without_prompts_draws_the_erased_concept_then_the_kept_ones_it_moved_most(erased, tmp_path, monkeypatch):
    from fewshot_erase import compare as comparing

    _, output = erased("sd1")
    record = json.loads((output / "erase.json").read_text())
    drift, template = record["effects"]["kept_drift"], record["concepts"][0]["templates"][0]
    most = sorted(drift, key=drift.get, reverse=True)[:2]
    drawn, generate = [], comparing.generate
    monkeypatch.setattr(comparing, "generate", lambda pipe, prompt, *rest: drawn.append(prompt) or generate(pipe, prompt, *rest))
    grid = comparing.compare(output, None, tmp_path / "grid.png", images=1, steps=1)
    assert len(drift) > 2 and most != sorted(drift)[:2], drift  # otherwise name order would pass too
    assert drawn[::2] == [template.format(concept) for concept in ["tiny robot"] + most]
    assert grid.exists()
