"""`lockstep bench MODE`: the modes, their options and how each is run.

Each mode lives in its own module with `HELP` (one line), `EXAMPLES`, `add_arguments(parser)`
and `run(args) -> int`. Modules import their heavy dependencies (torch, matplotlib, peers)
inside run(), so building the command line stays fast.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

# mode -> module of lockstep.bench
MODES = {"offline": "offline", "serve": "load", "compare": "compare", "search": "search", "voice": "voice"}


def add_parser(sub) -> argparse.ArgumentParser:
    bench = sub.add_parser(
        "bench", help="Benchmark tok/s and latency against the hardware and peers; JSON, markdown and plots.",
        description="Benchmarks that report figures against the hardware (the memory-bandwidth roofline, "
                    "measured in the same run) and against peers measured in the same run.",
        epilog="run `lockstep bench MODE --help` for a mode's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = bench.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, module_name in MODES.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        parser = modes.add_parser(mode, help=module.HELP, description=module.HELP, epilog=module.EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--out", type=Path, default=Path("lockstep-bench"),
                            help="folder for <mode>.json, <mode>.md and the PNG plots (default: ./lockstep-bench)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
        module.add_arguments(parser)
        parser.set_defaults(bench_run=module.run)
    return bench


def run(args: argparse.Namespace) -> int:
    return args.bench_run(args)
