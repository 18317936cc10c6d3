"""`eval run`'s settings as one dataclass: its flags (`python -m eval run --batch-size`) and the Python call
(`eval.run.run(..., batch_size=...)`) are made from these fields. Light to import: the command line's parser
needs it without loading torch or open_clip."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cir.benchmarks import BENCHMARKS, QUERY_METHODS
from cir.config import REQUIRED, ranged


@dataclass
class RunConfig:
    """`eval run`'s settings; each field is also its flag (cir.config.add_arguments: `--batch-size`)."""
    benchmark: str = ranged(REQUIRED, choices=BENCHMARKS, help="the benchmark's protocol")
    data: str = ranged(REQUIRED, help="the benchmark's root in its official layout")
    checkpoint: str = ranged(REQUIRED, help="a stage I/II export (or any CLIP for the baselines)")
    pretrained: Optional[str] = ranged(None, help="with a CLIP architecture name (baselines): its open_clip tag or "
                                                  "weights file")
    split: Optional[str] = ranged(None, help="default: the benchmark's evaluation split (val; test for Shoes and "
                                             "Fashion200k)")
    method: str = ranged("model", choices=QUERY_METHODS, help="the export's composed query, or a baseline")
    output: Optional[str] = ranged(None, help="where predictions, submission files and metrics go (default: "
                                              "CHECKPOINT/eval/BENCHMARK-SPLIT-METHOD; runs/eval/NAME/... for a "
                                              "CLIP by name)")
    template: Optional[str] = ranged(None, help="query prompt, $ = the pseudo tokens (default: the export's own, "
                                                "as trained)")
    batch_size: int = ranged(64, min=1, help="encoding batch size")
    device: str = ranged("cpu", help="torch device (cpu, cuda)")
    shared_concept: bool = ranged(False, help="CIRCO: prepend the shared concept to the caption")
    grids: int = ranged(6, min=0, help="queries shown in OUTPUT/examples.png (0: none)")
