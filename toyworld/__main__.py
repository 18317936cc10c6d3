"""`python -m toyworld pretrain ...` rebuilds the pretrained toy CLIP; `python -m toyworld strength DIR` scores
a CLIP by held-out caption -> image retrieval (toyworld.pretrain). The world itself is `beam_runner.py toy`."""
from __future__ import annotations

import json
import sys
from typing import Optional

USAGE = "usage: python -m toyworld {pretrain,strength} ... (--help after either says more)"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("pretrain", "strength"):
        print(USAGE, file=sys.stderr)
        return 2
    from toyworld import pretrain

    if argv[0] == "pretrain":
        return pretrain.run(argv[1:])
    import argparse

    p = argparse.ArgumentParser(prog="python -m toyworld strength",
                                description="held-out caption -> image R@1/R@5 of a CLIP in each vocabulary")
    p.add_argument("clip", help="a CLIP directory (an export) or a tiny model name")
    p.add_argument("--n", type=int, default=1000, help="held-out scenes per vocabulary")
    args = p.parse_args(argv[1:])
    if args.n < 5:
        p.error(f"--n must be at least 5, not {args.n}")
    print(json.dumps(pretrain.clip_strength(args.clip, args.n), indent=1))
    return 0


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
