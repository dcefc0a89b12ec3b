"""Speed and memory benchmark: each phase of a real erase, the training loop against its floor, peak memory.

    python benchmarks/speed.py                                   # the demo model, default erase
    python benchmarks/speed.py --model sd1 --resolution 256 --steps 2 --device cpu
    python benchmarks/speed.py --model sd1 --model sdxl --device cuda -o speed.json

The same as `fewshot-erase bench` (see `fewshot_erase/bench.py` for what is measured and how).
"""

from fewshot_erase.cli.bench import bench_command

if __name__ == "__main__":
    bench_command(prog_name="benchmarks/speed.py")
