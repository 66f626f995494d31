"""Lightning glue: the LightningModule, the DataModule, callbacks, the torchmetrics validation metrics and
the checks train.py runs (guards). The library (models, losses, data) does not depend on this package."""
