"""When a several-concept erase holds each concept (the stop check found it gone), and whether the judge agreed then.

    python -m benchmarks.when_held 0,6,9               # the default erase of zero, six and nine together, seed 0
    python -m benchmarks.when_held 0,8,9 --seed 1 -o /tmp/held.json

A concept found gone leaves the rotation and is held where it is (unlearning.hold) until a check finds it back, so
whatever is still drawn of it when it is held for good stays. This runs the default erase of the digits together,
keeps the text encoder as it was at each hold, and judges every erased digit's word prompt (20 images, seeds
3000-3019, as benchmarks.robustness does) at each hold and at the end; with every stop check's advantages.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from demo.measure import JUDGED_SEEDS, SAMPLES



def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("digits", help="the digits erased together, e.g. 0,6,9")
    parser.add_argument("--seed", type=int, default=0, help="erase seed")
    parser.add_argument("-o", "--output", help="also write the report here as JSON")
    args = parser.parse_args(argv)

    import warnings

    import torch

    from demo.data import DIGIT_WORDS
    from demo.measure import erased_pipeline, judged, load_base, prompt_for
    from fewshot_erase import unlearning
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec
    from fewshot_erase.errors import EraseWarning

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", EraseWarning)  # "no --model given: the demo"
    digits = [int(d) for d in args.digits.split(",")]
    held, hold = [], unlearning.hold

    def kept_at_hold(loop, target):
        encoders = {name: loop.parts.text_encoder(name) for name in loop.parts.family.encoders}
        held.append((target.concept, {name: {k: v.detach().clone() for k, v in e.state_dict().items()}
                                      for name, e in encoders.items()}))
        return hold(loop, target)

    specs = [ConceptSpec(DIGIT_WORDS[d], (str(SAMPLES / DIGIT_WORDS[d]),)) for d in digits]
    unlearning.hold = kept_at_hold
    try:
        with tempfile.TemporaryDirectory() as workdir:
            result = erase_concepts(specs, Path(workdir) / "out", device="cpu", seed=args.seed)
            parts, generation = load_base()

            def drawn(pipe) -> dict:
                return {DIGIT_WORDS[d]: judged(pipe, prompt_for("word", d), d, JUDGED_SEEDS, generation) for d in digits}

            at_end = drawn(erased_pipeline(parts, Path(workdir) / "out"))
    finally:
        unlearning.hold = hold
    at_holds = []
    for concept, states in held:
        for name, state in states.items():
            parts.text_encoder(name).load_state_dict(state)
        at_holds.append({"held": concept, "drawn": drawn(parts.pipeline)})
    checks = [{"step": i + 1, "advantage": e["advantage"], "held": e.get("held", []), "back": e.get("back", [])}
              for i, e in enumerate(result.record["trajectory"]) if "advantage" in e]
    report = {"digits": digits, "seed": args.seed, "steps": result.record["steps"],
              "effects": result.record["effects"]["erased"], "checks": checks, "at_holds": at_holds, "at_end": at_end}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    for entry in at_holds:
        print(f"held {entry['held']}: drawn " + ", ".join(f"{w} {share:.0%}" for w, share in entry["drawn"].items()))
    print(f"after {report['steps']} steps: drawn " + ", ".join(f"{w} {share:.0%}" for w, share in at_end.items()))
    return report


if __name__ == "__main__":
    main()
