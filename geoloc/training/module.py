"""LightningModule: glue between the geolocator, its losses and the metrics.

Losses (tensor-only modules in :mod:`geoloc.losses`):

* geocell classification against haversine-smoothed labels (PIGEON, tau in km);
* image-GPS InfoNCE (GeoCLIP): each image against its own GPS and a queue of GPS negatives that are
  re-encoded with the current location encoder every step;
* per evidence head, cross-entropy against the batch's ``evidence/<head>`` labels (masked ones left out);
* for a network with a text decoder, next-token cross-entropy on each photo's stage-wise text, written from its
  coordinates and scene label (:mod:`geoloc.evidence.captions`; weight ``loss_weights.text``).

Batches carry photos (``image``) or a frozen backbone's cached features (``features``,
:class:`~geoloc.training.datamodule.FeatureDataModule`); for features only the heads run
(:meth:`~geoloc.models.geolocator.GeoLocator.heads`), with the same losses and metrics. A backbone with no
trainable parameter is kept in eval mode throughout (its BatchNorm statistics and dropout fixed), so that it
computes in training what it computes when its features are cached and when the run predicts.

Validation metrics are torchmetrics (:class:`~geoloc.training.metrics.DistanceMetrics`, ``MeanMetric``), so
that under DDP they are those of every rank's photos together.

Logged keys: ``train/loss``, ``train/lr``, ``train/loss_cell``, ``train/loss_gps``, ``train/gps_acc``,
``train/logit_scale``, ``train/loss_ev_<head>``, ``train/loss_text``, ``val/loss_cell``, ``val/loss_text``,
``val/acc_{1,25,200,750,2500}km``, ``val/median_km``, ``val/mean_km``, ``val/geoscore``, ``val/n``,
``val/acc_ev_<head>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric

from geoloc.geo.cells import Geocells
from geoloc.losses import GPSContrastiveLoss, GPSQueue, HaversineSmoothingLoss, gather_latlng
from geoloc.models.geolocator import GeoLocator
from geoloc.precision import training_attention
from geoloc.training.metrics import DistanceMetrics


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_ratio``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class GeoLocModule(pl.LightningModule):
    """Trains a :class:`GeoLocator`.

    Args:
        model: the network (its weights are saved under ``model.*`` in checkpoints).
        cells: the geocells its head classifies into: their centroids for the smoothed labels and the
            guesses, their fingerprint (:meth:`~geoloc.geo.cells.Geocells.fingerprint`) saved in every
            checkpoint (``checkpoint["geoloc"]``) so that loading refuses other cells.
        optimizer: partial optimizer (``params`` missing), e.g. ``torch.optim.AdamW``.
        tau_km: haversine smoothing temperature; 0 gives hard labels.
        loss_weights: ``{"cell": w, "gps": w, "text": w}``; a zero weight skips that loss (``text`` applies to a
            network with a text decoder only).
        queue_size: GPS negatives kept for the contrastive loss.
        temperature: initial InfoNCE temperature (learnable).
        warmup_steps: linear warmup before the cosine decay (which spans the whole run).
        evidence_weights: ``{head: w}``: cross-entropy of each evidence head of the model against the
            batch's ``evidence/<head>`` labels (masked labels, -1, left out), weighted into the loss.
        text_batch: the text loss on the first ``text_batch`` photos of each training batch only (None: all): the
            decoder's share of a step for a CPU budget; batches are shuffled, so every photo's text is learned.
    """

    def __init__(self, model: GeoLocator, cells: Geocells, optimizer: Callable, tau_km: float = 65.0,
                 loss_weights: dict | None = None, queue_size: int = 4096, temperature: float = 0.07,
                 warmup_steps: int = 100, evidence_weights: dict | None = None, text_batch: int | None = None):
        super().__init__()
        self.cells_fingerprint = cells.fingerprint()
        loss_weights = {str(k): float(v) for k, v in (loss_weights or {}).items()}  # plain types only, so
        # checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"tau_km": float(tau_km), "loss_weights": loss_weights,
                                   "queue_size": int(queue_size), "temperature": float(temperature),
                                   "warmup_steps": int(warmup_steps),
                                   "evidence_weights": {str(k): float(v) for k, v in (evidence_weights or {}).items()},
                                   "text_batch": None if text_batch is None else int(text_batch)})
        if text_batch is not None and int(text_batch) < 1:
            raise ValueError(f"text_batch must be at least 1 (or null for every photo), got {text_batch}")
        self.text_batch = None if text_batch is None else int(text_batch)
        self.model = model
        self.cell_loss = HaversineSmoothingLoss(torch.tensor(cells.centroids, dtype=torch.float32), tau_km=tau_km)
        self.gps_loss = GPSContrastiveLoss(init_temperature=temperature)
        self.queue = GPSQueue(queue_size)
        self.weights = {"cell": 1.0, "gps": 1.0, "text": 1.0, **(loss_weights or {})}
        if model.text_decoder is None:
            self.weights["text"] = 0.0
        self._captions = None  # the CaptionWriter, made on first use (it reads the label rasters)
        self.evidence_weights = {h: float(w) for h, w in (evidence_weights or {}).items()
                                 if float(w) > 0 and h in model.evidence}
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.val_distance = DistanceMetrics()
        self.val_acc_ev = torch.nn.ModuleDict({h: MeanMetric() for h in self.evidence_weights})
        self.trained_batches = 0  # batches that had photos, in this process (train.py checks some ran)

    @property
    def centroids(self) -> torch.Tensor:
        return self.cell_loss.cell_centroids

    @property
    def backbone_frozen(self) -> bool:
        """No parameter of the image encoder is trained."""
        return not any(p.requires_grad for p in self.model.image_encoder.parameters())

    def train(self, mode: bool = True) -> GeoLocModule:
        super().train(mode)
        if self.backbone_frozen:
            self.model.image_encoder.eval()
        return self

    def on_fit_start(self) -> None:
        # bf16 on a CPU: explicit attention trains faster than the fused kernel there (geoloc.precision)
        self._unfused = training_attention(self.model, str(self.trainer.precision), self.device)
        if self.weights["text"]:
            self._prime_captions()

    def _caption_writer(self):
        if self._captions is None:
            from geoloc.evidence.captions import CaptionWriter

            self._captions = CaptionWriter()
            if self._captions.vocab.fingerprint != self.model.text_decoder.vocab_fingerprint:
                raise ValueError("the text decoder was built for another caption vocabulary")
        return self._captions

    def _prime_captions(self) -> None:
        """Writes the text of every photo of a table or feature-cache source in one vectorized pass (a batch
        then only looks its photos up); streamed shards are written batch by batch."""
        from geoloc.data.features import FeatureCache
        from geoloc.data.readers import GeoDataset
        from geoloc.evidence.captions import CAPTION_HEADS
        from geoloc.training.datamodule import table_evidence_labels

        dm = getattr(self.trainer, "datamodule", None)
        for source in (getattr(dm, "train_source", None), getattr(dm, "val_source", None)):
            if isinstance(source, GeoDataset):
                self._caption_writer()(source.latlng, labels=table_evidence_labels(source, CAPTION_HEADS))
            elif isinstance(source, FeatureCache):
                self._caption_writer()(source.latlng, labels=source.labels)

    def on_fit_end(self) -> None:
        for m in getattr(self, "_unfused", ()):  # the network leaves fitting as it came
            m.fused_attn = True
        self._unfused = []

    def on_train_epoch_start(self) -> None:
        # Lightning does not call train() when fitting starts (a new network is in train mode as built)
        if self.backbone_frozen:
            self.model.image_encoder.eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images)

    def _outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The network's outputs for a batch of photos (``image``) or of cached backbone features (``features``)."""
        if "features" in batch:
            return self.model.heads(batch["features"])
        return self.model(batch["image"])

    def _text_tokens(self, batch: dict) -> torch.Tensor:
        """``[B, T]`` each photo's training text (:mod:`geoloc.evidence.captions`), from its coordinates and the
        evidence labels the batch carries (train.py has it carry every one a text needs)."""
        from geoloc.evidence.captions import CAPTION_HEADS

        captions = self._caption_writer()
        latlng = batch["latlng"].detach().cpu().numpy()
        if all(f"evidence/{h}" in batch for h in CAPTION_HEADS):
            tokens = captions(latlng, labels={h: batch[f"evidence/{h}"].cpu().numpy() for h in CAPTION_HEADS})
        else:
            scene = batch.get("evidence/scene")
            tokens = captions(latlng, None if scene is None else scene.cpu().numpy())
        tokens = torch.from_numpy(tokens).to(batch["latlng"].device)
        return tokens[:, : int((tokens != captions.vocab.pad_id).sum(1).max())]  # no all-pad columns

    def _text_loss(self, batch: dict, out: dict, n: int | None = None) -> torch.Tensor:
        """The text decoder's loss on the first ``n`` photos of the batch (None: all)."""
        tokens = self._text_tokens(batch)
        features = out["features"]
        if n is not None:
            tokens, features = tokens[:n], features[:n]
        return self.model.text_decoder.loss(features, tokens)

    def _losses(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        latlng = batch["latlng"]
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=latlng.device)
        if self.weights["cell"]:
            cell = self.cell_loss(out["cell_logits"], latlng, cell_ids=batch.get("cell"))
            losses["loss_cell"] = cell["loss"]
            total = total + self.weights["cell"] * cell["loss"]
        if self.weights["gps"]:
            queued = self.queue.get()
            # the whole batch of GPS and the queue are (re-)encoded with the current encoder
            gps = self.model.encode_gps(torch.cat([latlng, queued.to(latlng)]))
            g = self.gps_loss(out["image_emb"], gps[: len(latlng)], gps[len(latlng):] if len(queued) else None)
            losses.update(loss_gps=g["loss"], gps_acc=g["acc"], logit_scale=g["logit_scale"])
            total = total + self.weights["gps"] * g["loss"]
        if self.weights["text"]:
            losses["loss_text"] = self._text_loss(batch, out, self.text_batch if self.training else None)
            total = total + self.weights["text"] * losses["loss_text"]
        for head, w in self.evidence_weights.items():
            labels = batch.get(f"evidence/{head}")
            if labels is None:
                continue
            known = labels >= 0
            ce = (torch.nn.functional.cross_entropy(out[f"evidence/{head}"][known], labels[known]) if known.any()
                  else out[f"evidence/{head}"].sum() * 0.0)
            losses[f"loss_ev_{head}"] = ce
            total = total + w * ce
        losses["loss"] = total
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if len(batch["latlng"]) == 0:  # every photo of the batch was unreadable (counted by the collate)
            return None  # Lightning skips the step
        out = self._outputs(batch)
        losses = self._losses(batch, out)
        bs = len(batch["latlng"])
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=bs)
        self.log("train/loss", losses["loss"].detach(), batch_size=bs, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        if self.weights["gps"]:
            self.queue.enqueue(gather_latlng(batch["latlng"].detach()))
        self.trained_batches += 1
        return losses["loss"]

    @torch.no_grad()
    def predict_latlng(self, images: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
        """Top cell centroid as the guess.

        Returns:
            ``latlng [B, 2]``, ``topk_cells [B, k]``, ``topk_prob [B, k]``.
        """
        logits = self.model(images)["cell_logits"]
        prob = logits.float().softmax(-1)
        p, idx = prob.topk(min(k, prob.shape[-1]), dim=-1)
        return {"latlng": self.centroids[idx[:, 0]], "topk_cells": idx, "topk_prob": p}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["latlng"]) == 0:
            return
        out = self._outputs(batch)
        bs = len(batch["latlng"])
        if self.weights["cell"]:
            cell = self.cell_loss(out["cell_logits"], batch["latlng"], cell_ids=batch.get("cell"))
            self.log("val/loss_cell", cell["loss"], batch_size=bs, sync_dist=True)
        if self.weights["text"]:
            self.log("val/loss_text", self._text_loss(batch, out), batch_size=bs, sync_dist=True)
        for head in self.evidence_weights:
            labels = batch.get(f"evidence/{head}")
            if labels is not None and (labels >= 0).any():
                known = labels >= 0
                correct = (out[f"evidence/{head}"][known].argmax(-1) == labels[known]).float() * 100
                self.val_acc_ev[head].update(correct)
                self.log(f"val/acc_ev_{head}", self.val_acc_ev[head], on_step=False, on_epoch=True)
        self.val_distance.update(self.centroids[out["cell_logits"].argmax(-1)], batch["latlng"])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size == 1 and not self.val_distance.update_called:
            return  # no photo was scored (every one unreadable): nothing to log
        m = self.val_distance.compute()  # gathered over every rank's photos
        self.val_distance.reset()
        if m["n"] == 0:
            return
        self.log_dict({f"val/{k}": float(v) for k, v in m.items() if k != "n" and np.isfinite(v)}, sync_dist=False)
        self.log("val/n", float(m["n"]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the torch RNG (dropout) so that a resumed run continues exactly
        checkpoint["geoloc_rng"] = torch.get_rng_state()
        # what the head's outputs mean: loading refuses a cells file with another fingerprint
        checkpoint["geoloc"] = {"cells_fingerprint": self.cells_fingerprint, "num_cells": int(self.centroids.shape[0])}
        if self.model.text_decoder is not None:  # what the decoder's tokens mean: loading refuses another vocabulary
            checkpoint["geoloc"]["caption_vocab"] = self.model.text_decoder.vocab_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "geoloc_rng" in checkpoint:
            torch.set_rng_state(checkpoint["geoloc_rng"])

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name.endswith(".bias") or "logit_scale" in name else decay).append(p)
        opt = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1000
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.warmup_steps, max(total, 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
