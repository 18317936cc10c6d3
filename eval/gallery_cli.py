"""`python -m eval index | search | serve`: the command-line side of eval/gallery.py and eval/serve.py."""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from eval.gallery import GalleryError, GalleryIndex, IndexConfig, Searcher, build_index


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
    return 0


def _write_grid(searcher: Searcher, args: argparse.Namespace, found: dict, row) -> None:
    from PIL import Image

    from eval.grids import GridRow, render_grid

    gallery = searcher.index
    ref = None
    if args.image or row is not None:
        ref = searcher.query_image(args.image if args.image else gallery.image_bytes(row))[0]
    results = [(Image.open(io.BytesIO(gallery.thumb(r["row"]))), r["name"], r["score"]) for r in found["results"]]
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    render_grid([GridRow(ref, args.text or "", results)]).save(args.grid)
    print(f"eval search: wrote {args.grid}", file=sys.stderr)


def serve(args: argparse.Namespace) -> int:
    from eval.serve import make_server

    gallery = GalleryIndex(args.index)
    searcher = Searcher(gallery, args.checkpoint, args.device, args.pretrained)
    server = make_server(searcher, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"eval serve: {len(gallery)} images from {args.index} at http://{host}:{port}/ (Ctrl-C stops)",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
