"""Write the demo model as one single-file checkpoint in the CompVis layout that A1111 and ComfyUI load, to try
`fewshot-erase apply` on without a checkpoint of your own:

    python -m demo.single_file demo.safetensors
    fewshot-erase apply erased/ demo.safetensors -o demo-without-seven.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors" or args.output.exists():
        parser.error(f"{args.output} must be a new .safetensors path")
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))  # the converter the tests write their checkpoints with
    from fewshot_erase.models import quiet_libraries
    from fewshot_erase.writers.atomic import staged_file

    quiet_libraries()  # as the CLI is: no loading bars, no warnings about image processors the demo does not use
    from diffusers import StableDiffusionPipeline
    from tiny_pipelines import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(str(REPO / "fewshot_erase" / "demo"))
    with staged_file(args.output, overwrite=False) as staging:  # whole or not at all, with the umask's mode
        save_single_file(pipe, staging, "sd1")
        staging.chmod(0o666 & ~umask())
    print(f"wrote {args.output}")
    return args.output


def umask() -> int:
    current = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(current)
    return current


if __name__ == "__main__":
    main()
