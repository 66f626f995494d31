"""Image transforms and the training sample.

The transforms are GeoCLIP-style training augmentation and timm's evaluation transform, at the backbone's
input size and normalization (its ``data_config``). :func:`decode_sample` turns one stored photo into the
sample both training paths yield (the map-style table dataset and the shard stream), so that the collate
sees one layout. Kept apart from the training glue so that prediction does not import Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


def train_transform(data_config: dict, scale: tuple[float, float] = (0.5, 1.0)):
    """GeoCLIP-style augmentation at the backbone's input size and normalization."""
    from torchvision import transforms as T

    size = data_config["input_size"][-1]
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(data_config["mean"], data_config["std"]),
    ])


def eval_transform(data_config: dict):
    """The evaluation transform for the backbone: timm's (resize, centre crop, normalize), or Hugging Face's
    CLIP image processor when ``data_config["preprocess"] == "clip"`` (:func:`clip_processor_transform`)."""
    config = dict(data_config)
    if config.pop("preprocess", "timm") == "clip":
        return clip_processor_transform(config)
    from timm.data import create_transform

    return create_transform(**config, is_training=False)


class clip_processor_transform:  # noqa: N801 - used like a function, as torchvision's transforms are
    """PIL image -> normalized ``(3, S, S)`` float tensor exactly as Hugging Face's ``CLIPImageProcessor``
    (its torchvision backend, which GeoCLIP's ``preprocess_image`` runs) does it: the uint8 image resized so
    its shortest side is ``S`` (bicubic, antialiased, the long side ``int(S * long / short)``), centre-cropped
    at ``int((size - S) / 2)``, then ``(x - 255 mean) / (255 std)``.

    Args:
        data_config: ``input_size`` ``(3, S, S)``, ``mean``, ``std``.
    """

    def __init__(self, data_config: dict):
        import torch

        self.size = int(data_config["input_size"][-1])
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1) * 255.0
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1) * 255.0

    def __call__(self, image):
        import numpy as np
        import torch
        from torchvision.transforms.v2 import functional as tvF

        x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8
        h, w = int(x.shape[1]), int(x.shape[2])
        s = self.size
        new = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        x = tvF.resize(x, list(new), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        top, left = int((new[0] - s) / 2.0), int((new[1] - s) / 2.0)
        x = x[:, top:top + s, left:left + s]
        return (x.to(torch.float32) - self.mean) / self.std


def decode_sample(photo, *, key: str, latlng, labels: Mapping[str, int] | None = None,
                  transform: Callable | None = None, max_pixels: int | None = None, name: str | None = None,
                  seed: int | None = None) -> dict:
    """One training sample from a stored photo.

    Args:
        photo: a path or the encoded bytes (see :func:`geoloc.data.images.decode_image`).
        key: the image id.
        latlng: ``(2,)`` ``[lat, lng]`` degrees.
        labels: ``{head: class index}`` evidence labels (-1 where masked), computed before (at sharding time,
            or once per table), never here.
        transform: applied to the upright RGB ``PIL.Image``; None keeps the image.
        max_pixels: larger photos are refused as decompression bombs (None: the decoder's default).
        name: how errors name the photo (a shard member, say).
        seed: when given, the transform's randomness is seeded by it (torch's global generator is left as it
            was), so that the same sample gets the same augmentation in a resumed run.

    Returns:
        ``{"image": transform(image), "latlng": float32 tensor (2,), "key": str, "labels": {head: int}}``.

    Raises:
        geoloc.data.images.ImageError: the photo does not decode (callers turn it into :func:`bad_sample`
            or a skip).
    """
    import torch

    from geoloc.data.images import DEFAULT_MAX_PIXELS, decode_image

    image = decode_image(photo, name=name, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    if transform is not None and seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # the CPU generator the transforms draw from (not
            image = transform(image)  # torch.manual_seed, which also queues a CUDA seeding with a stack trace)
    elif transform is not None:
        image = transform(image)
    return {"image": image, "latlng": torch.tensor(latlng, dtype=torch.float32), "key": str(key),
            "labels": dict(labels or {})}


def bad_sample(key: str, reason: str) -> dict:
    """The marker that stands for a photo that could not be used: ``{"key", "bad": reason}``.

    The training collate drops it from the batch, counts it and lists it in the batch's ``skipped``.
    """
    return {"key": str(key), "bad": str(reason)}


def is_bad_sample(sample) -> bool:
    """Whether ``sample`` is a :func:`bad_sample` marker (or None) rather than a decoded sample."""
    return sample is None or "bad" in sample
