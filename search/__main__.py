"""`python -m search index | search | serve`: encode a gallery into an index on disk, query it from the command
line, or browse it on a local web page (search/index.py, search/search.py, search/serve.py; docs/SEARCH.md)."""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Optional

from cir.errors import CIRError
from search.index import GalleryError, GalleryIndex, IndexConfig, build_index
from search.search import Searcher

TARGET_DEPTH = 1000  # search --target: how deep its rank is looked for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("index", help="encode a gallery once into an index on disk (incremental)")
    i.add_argument("--checkpoint", required=True, help="a stage I/II export or any CLIP")
    i.add_argument("--pretrained", help="with a CLIP architecture name: its open_clip tag or weights file")
    i.add_argument("--images", required=True, help="a folder, a glob, webdataset tars or a caption dataset dir")
    i.add_argument("--output", required=True, help="the index directory (created, or extended)")
    i.add_argument("--batch-size", type=at_least_one, default=64)
    i.add_argument("--device", default="cpu")
    i.add_argument("--thumb-size", type=at_least_one, default=256, help="longest side of the stored thumbnails")
    i.add_argument("--faiss-min", type=int, default=100_000, help="galleries this large also get a faiss index")
    q = sub.add_parser("search", help="ranked results of a composed, text-only or image-only query")
    q.add_argument("--index", required=True)
    q.add_argument("--image", help="the reference image (a file)")
    q.add_argument("--reference", help="the reference image, by its name in the index")
    q.add_argument("--text", help="the modification text")
    q.add_argument("--k", type=at_least_one, default=10)
    q.add_argument("--checkpoint", help="default: the one the index was built with")
    q.add_argument("--pretrained", help="with a CLIP architecture name: its tag or weights file (default: the index's)")
    q.add_argument("--keep-reference", action="store_true", help="let the reference itself be a result")
    q.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    q.add_argument("--grid", help="also write the results as a PNG grid here")
    q.add_argument("--target", help="the image you expect (a name in the index): outlined in --grid, its rank "
                                    f"reported (searched to the top {TARGET_DEPTH})")
    q.add_argument("--device", default="cpu")
    v = sub.add_parser("serve", help="a local web page for searching an index")
    v.add_argument("--index", required=True)
    v.add_argument("--checkpoint", help="default: the one the index was built with")
    v.add_argument("--pretrained", help="with a CLIP architecture name: its tag or weights file (default: the index's)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    v.add_argument("--port", type=port, default=7860, help="1-65535 (default 7860)")
    v.add_argument("--device", default="cpu")
    return p


def at_least_one(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return value


def port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return value


def index(args: argparse.Namespace) -> int:
    summary = build_index(IndexConfig(images=args.images, output=args.output, checkpoint=args.checkpoint,
                                      pretrained=args.pretrained, batch_size=args.batch_size, device=args.device,
                                      thumb_size=args.thumb_size, faiss_min=args.faiss_min))
    print(json.dumps(summary, sort_keys=True))
    return 0


def _reference_row(gallery: GalleryIndex, name: str) -> int:
    try:
        return gallery.names.index(name)
    except ValueError:
        raise GalleryError(f"no image named {name!r} in {gallery.dir}") from None


def search(args: argparse.Namespace) -> int:
    if args.image and args.reference:
        raise GalleryError("give the reference as --image (a file) or --reference (a name in the index), not both")
    gallery = GalleryIndex(args.index)
    searcher = Searcher(gallery, args.checkpoint, args.device, args.pretrained)
    row = _reference_row(gallery, args.reference) if args.reference else None
    if args.target:
        _reference_row(gallery, args.target)  # a name in the index, or exit 2 naming it
        deep = searcher.search(args.image, args.text, max(args.k, TARGET_DEPTH), row, args.keep_reference)
        rank = next((r["rank"] for r in deep["results"] if r["name"] == args.target), None)
        found = {**deep, "results": deep["results"][:args.k], "target": {"name": args.target, "rank": rank}}
    else:
        found = searcher.search(args.image, args.text, args.k, row, args.keep_reference)
    if args.grid:
        _write_grid(searcher, args, found, row)
    if args.json:
        print(json.dumps(found, sort_keys=True))
        return 0
    print(f"# {found['method']} query, {len(found['results'])} of {len(gallery)} images"
          + (f"; left out the reference {found['excluded']}" if found["excluded"] else ""))
    for r in found["results"]:
        print(f"{r['rank']:>4}  {r['score']:.4f}  {r['name']}")
    if args.target:
        print(f"# target {_target_note(found['target'])}")
    return 0


def _target_note(target: dict, shown: int = 0) -> str:
    """Where the --target ranked, when below the `shown` results ("" when among them)."""
    if target["rank"] is None:
        return f"{target['name']} not in the top {TARGET_DEPTH}"
    return f"{target['name']} at #{target['rank']}" if target["rank"] > shown else ""


def _write_grid(searcher: Searcher, args: argparse.Namespace, found: dict, row) -> None:
    from PIL import Image

    from cir.grids import GridRow, render_grid

    gallery = searcher.index
    ref = None
    if args.image or row is not None:
        ref = searcher.query_image(args.image if args.image else gallery.image_bytes(row))[0]
    results = [(Image.open(io.BytesIO(gallery.thumb(r["row"]))), r["name"], r["score"]) for r in found["results"]]
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    target = found.get("target")
    note = _target_note(target, len(results)) if target else ""
    render_grid([GridRow(ref, args.text or "", results, {target["name"]} if target else set(), note)]).save(args.grid)
    print(f"search search: wrote {args.grid}", file=sys.stderr)


def serve(args: argparse.Namespace) -> int:
    from search.serve import make_server

    gallery = GalleryIndex(args.index)
    searcher = Searcher(gallery, args.checkpoint, args.device, args.pretrained)
    server = make_server(searcher, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"search serve: {len(gallery)} images from {args.index} at http://{host}:{port}/ (Ctrl-C stops)",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"index": index, "search": search, "serve": serve}[args.command](args)
    except CIRError as err:  # the index, the query, the checkpoint or the images it names
        print(f"python -m search {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
