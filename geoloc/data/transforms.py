"""Image transforms: GeoCLIP-style training augmentation and timm's evaluation transform, at the
backbone's input size and normalization (its ``data_config``). Kept apart from the training glue so
that prediction does not import Lightning."""

from __future__ import annotations


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
    """timm's evaluation transform (resize, centre crop, normalize) for the backbone."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)
