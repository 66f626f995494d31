"""Lightning glue: the LightningModule, the DataModule and callbacks. The library (models, losses,
data) does not depend on this package."""
