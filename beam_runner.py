"""Entry point of the data jobs: `python beam_runner.py COMMAND [flags] [Beam options]`.

Each command is a module exposing `run(argv)`; Beam jobs among them split their own flags from
PipelineOptions with `parse_known_args` (SPEC.md, "Commands").
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules are imported only when their command runs, so `toy` does not
# pay for importing Beam and `--help` stays fast.
COMMANDS = {
    "toy": ("toyworld.cli", "render the procedural toy world and its held-out benchmarks"),
    "caption": ("pipeline.caption", "caption images into WebDataset shards (Beam)"),
    "synth": ("synth.job", "synthesize low- or high-quality CIR triplets from a caption dataset (Beam)"),
    "inspect": ("pipeline.inspect", "validate a caption or triplet dataset against SPEC.md and summarise it"),
}


def usage() -> str:
    lines = ["usage: python beam_runner.py COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`python beam_runner.py COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"beam_runner.py: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    result = module.run(rest)
    return result if isinstance(result, int) else 0  # inspect returns its exit status; jobs return stats


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
