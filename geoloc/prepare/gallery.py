"""The GPS gallery of a checkpoint, embedded once by its location encoder (refine=gallery reads it).

    python -m geoloc gallery ckpt=RUN/checkpoints/best.ckpt                  # the 100K MP-16 coordinates
    python -m geoloc gallery ckpt=... source=coords.csv out=DIR/gallery.npz   # any CSV with lat,lng columns

Writes ``RUN/gallery_v1.npz`` (or ``out=PATH``) atomically; see :mod:`geoloc.retrieval.gallery`.
"""

from __future__ import annotations

import time
from pathlib import Path

from geoloc.cli import run_step
from geoloc.retrieval.gallery import GPSGallery, default_gallery_path


def build(ckpt: str | Path, *, source: str = "mp16_gallery", out: str | Path | None = None, batch_size: int = 4096,
          device: str = "cpu") -> tuple[GPSGallery, Path]:
    """Embeds the gallery coordinates of ``source`` with the checkpoint's location encoder and saves them.

    Args:
        ckpt: ``RUN/checkpoints/*.ckpt``.
        source: ``mp16_gallery`` (the 100K MP-16 coordinates shipped with geoclip) or a CSV path with
            lat/lng columns.
        out: the file; None: ``RUN/gallery_v1.npz``.
        batch_size: coordinates per encoder call.
        device: where the encoder runs.

    Returns:
        ``(gallery, path)``.
    """
    from geoloc.data.readers import load_reference_latlng
    from geoloc.models.loading import load_checkpoint

    model = load_checkpoint(ckpt, device=device)
    source = str(source)
    latlng = (load_reference_latlng("mp16_gallery") if source == "mp16_gallery"
              else load_reference_latlng("csv", csv=source))
    gallery = GPSGallery.build(model.net.location_encoder, latlng, batch_size=batch_size,
                               settings={"source": source if source == "mp16_gallery" else str(Path(source).resolve()),
                                         "ckpt": str(Path(ckpt).resolve())})
    path = Path(out) if out else default_gallery_path(ckpt)
    gallery.save(path)
    return gallery, path


def main(cfg) -> Path:
    """Builds and writes the gallery cache; prints what it wrote."""
    started = time.perf_counter()
    gallery, path = build(cfg.ckpt, source=cfg.source, out=cfg.out, batch_size=cfg.batch_size, device=cfg.device)
    print(f"embedded {len(gallery)} gallery coordinates of {cfg.source} ({gallery.embeddings.shape[1]}-d, encoder "
          f"{gallery.fingerprint}) in {time.perf_counter() - started:.1f} s\ngallery: {path}")
    return path


def run():
    return run_step("gallery", main, "geoloc gallery")


if __name__ == "__main__":
    run()
