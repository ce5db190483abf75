"""The `nemotron3` command line: `quickstart`, `upcycle`, `cpu-kernels`, `publish` (benchmarks live in `scripts/` of a source checkout).

Each subcommand lives with its feature; this file only routes ``nemotron3 NAME ARGS...`` to it.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help); each module has `main(argv: list[str]) -> int`
COMMANDS = {
    "quickstart": ("transformers_nemotron3.quickstart",
                   "a tiny model from pretraining to RL, generation and reload, on CPU"),
    "upcycle": ("transformers_nemotron3.upcycling.cli", "convert a dense checkpoint into a Nemotron 3 MoE"),
    "cpu-kernels": ("transformers_nemotron3.cpu_kernels", "build (once) and check the CPU decode kernels"),
    "publish": ("transformers_nemotron3.publish.cli", "check a saved checkpoint, write its model card, upload it"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nemotron3` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nemotron3 COMMAND [ARGS...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<12} {help_text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nemotron3: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
