"""Training losses: tensor-only ``nn.Module`` s, tensors in and a dict out (``{"loss": ..., ...}``)."""

from geoloc.losses.gps_contrastive import GPSContrastiveLoss, GPSQueue, gather_latlng
from geoloc.losses.haversine_smoothing import HaversineSmoothingLoss, haversine_smoothed_targets

__all__ = [
    "GPSContrastiveLoss",
    "GPSQueue",
    "HaversineSmoothingLoss",
    "gather_latlng",
    "haversine_smoothed_targets",
]
