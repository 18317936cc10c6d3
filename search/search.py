"""Searching a gallery index (`python -m search search`, the web page of `python -m search serve`): composed,
text-only and image-only queries with the checkpoint loaded once."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image

from cir.encoder import Encoder
from search.index import GalleryError, GalleryIndex

class Searcher:
    """Composed, text-only and image-only queries against an index, with the checkpoint loaded once."""

    def __init__(self, index: GalleryIndex, checkpoint: Optional[str] = None, device: str = "cpu",
                 pretrained: Optional[str] = None):
        self.index = index
        if not checkpoint:  # the index's own CLIP, with the weights it was given by name (if any)
            checkpoint, pretrained = index.manifest["checkpoint"], pretrained or index.manifest.get("pretrained")
        if not Path(checkpoint).exists() and Path(checkpoint).is_absolute():
            raise GalleryError(f"checkpoint {checkpoint} (recorded in the index) does not exist: pass --checkpoint")
        is_export = (Path(checkpoint) / "cir_config.json").is_file()
        self.encoder = Encoder(checkpoint, "model" if is_export else "sum", None, device, pretrained)
        if self.encoder.gallery_fingerprint != index.manifest["gallery_fingerprint"]:
            raise GalleryError(f"{index.dir} was built with another CLIP ({index.manifest['checkpoint']}) than "
                              f"{checkpoint}'s: rebuild the index with this checkpoint, or search with that one")
        self.checkpoint = checkpoint

    def query_image(self, image: Union[bytes, str, Path]) -> tuple[Image.Image, bytes]:
        from pipeline.images import ImageRejected, prepare_image

        if isinstance(image, (str, Path)):
            try:
                data = Path(image).read_bytes()
            except OSError as err:
                raise GalleryError(f"cannot read the query image {image}: {err.strerror or err}") from err
        else:
            data = image
        try:
            return prepare_image(data).image, data
        except ImageRejected as err:
            raise GalleryError(f"the query image is not a usable image ({err.reason}): {err}") from err

    def search(self, image: Union[bytes, str, Path, None] = None, text: Optional[str] = None, k: int = 10,
               reference_row: Optional[int] = None, keep_reference: bool = False) -> dict:
        """Ranked results for an image + text (composed), text-only or image-only query. The reference
        itself (the same bytes, or the picked gallery row) is left out of the results unless keep_reference."""
        if text is not None and not text.strip():
            raise GalleryError("the modification text is empty: give a text, or leave it out for an "
                              "image-only query")
        if reference_row is not None and not 0 <= reference_row < len(self.index):
            raise GalleryError(f"no gallery row {reference_row} (the index has {len(self.index)})")
        has_reference = image is not None or reference_row is not None
        if not has_reference and text is None:
            raise GalleryError("a query needs a reference image, a text, or both")
        if k < 1:
            raise GalleryError(f"k must be at least 1, got {k}")
        enc = self.encoder
        if not has_reference:
            method = "text_only"
        else:
            method = ("model" if enc.cir is not None else "sum") if text is not None else "image_only"
        img, exclude = None, -1
        if reference_row is not None:
            # a gallery row's features are in the index already; its pixels are read (from its source) only
            # when the mapping needs their patch tokens, for the composed model
            ref, exclude = self.index.features[reference_row:reference_row + 1], reference_row
            if method == "model":
                img = self.query_image(self.index.image_bytes(reference_row))[0]
        elif image is not None:
            img, data = self.query_image(image)
            ref = enc.images([img], 1, progress=False)
            exclude = self.index.row_of_sha.get(hashlib.sha256(data).hexdigest(), -1)
        else:
            ref = torch.zeros(1, enc.backbone.embed_dim)
        with torch.no_grad():
            q = enc.queries([img], ref, [[text or ""]], 1, method)
        if keep_reference:
            exclude = -1
        scores, rows = self.index.top(q, k, [exclude])
        results = [{"rank": i + 1, "row": r, "name": self.index.names[r], "score": round(s, 6),
                    "source": self.index.sources[r]} for i, (s, r) in enumerate(zip(scores[0].tolist(),
                                                                                   rows[0].tolist()))]
        return {"method": method, "text": text, "excluded": self.index.names[exclude] if exclude >= 0 else None,
                "results": results}
