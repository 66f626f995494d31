"""One precision setting: names, auto, the predictor's bf16 forward with float32 after the logits, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoloc.precision import autocast, bf16_supported, lightning_precision, resolve_precision


@pytest.mark.parametrize(("name", "want"), [("32", "32"), ("32-true", "32"), ("fp32", "32"), (32, "32"),
                                            ("bf16", "bf16"), ("bf16-mixed", "bf16"), ("BF16", "bf16")])
def test_names(name, want):
    assert resolve_precision(name, "cpu") == want


def test_auto_follows_the_hardware_and_bad_names_say_what_is_allowed():
    assert resolve_precision("auto", "cpu") == ("bf16" if bf16_supported("cpu") else "32")
    assert lightning_precision("auto", "cpu") == ("bf16-mixed" if bf16_supported("cpu") else "32-true")
    assert lightning_precision("16-mixed", "gpu") == "16-mixed"  # anything else is Lightning's to check
    with pytest.raises(ValueError, match="precision must be 32, bf16, 16 or auto"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("16", "cpu")


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(8, 8)
    with autocast("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("32", "cpu"):
        assert (a @ a).dtype == torch.float32


def test_the_predictor_runs_bf16_and_answers_in_float32(tiny_run):
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample
    from geoloc.inference.predictor import build_predictor

    images = [it.image for it in read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport())]
    fp32 = build_predictor(str(tiny_run["ckpt"]))
    bf16 = build_predictor(str(tiny_run["ckpt"]), precision="bf16")
    assert fp32.describe()["precision"] == "32" and bf16.describe()["precision"] == "bf16"
    a, b = fp32.forward(images), bf16.forward(images)
    for key in a:
        assert b[key].dtype == np.float32, key  # cast back before any softmax, ranking or distance
    np.testing.assert_allclose(b["cell_prob"].sum(1), 1.0, atol=1e-5)
    # bf16 rounds the logits, not the ranking: the same top cell for nearly every photo, close probabilities
    same = (a["cell_prob"].argmax(1) == b["cell_prob"].argmax(1)).mean()
    assert same >= 0.9, same
    assert np.abs(a["cell_prob"] - b["cell_prob"]).max() < 0.05
    rel = np.linalg.norm(a["features"] - b["features"]) / np.linalg.norm(a["features"])
    assert rel < 0.05, rel


def test_train_resolves_auto_and_records_it(tiny_run, tmp_path):
    """trainer.precision=auto trains in bf16-mixed on a CPU that has it, and config.yaml says which."""
    import yaml

    from .conftest import _train_tiny

    out = _train_tiny(tmp_path, "trainer.precision=auto")
    saved = yaml.safe_load((out["run"] / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == lightning_precision("auto", "cpu")


def test_the_bf16_export_answers_as_the_eager_bf16_predictor(tiny_run, tmp_path):
    """A bf16 export holds a bfloat16 copy of the network (the fp32 export is unchanged) and ranks the cells
    as the eager bf16 predictor does, within bf16's rounding."""
    import torch

    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample
    from geoloc.inference.export import export
    from geoloc.inference.exported import ExportedPredictor
    from geoloc.inference.predictor import build_predictor

    items = list(read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport()))[:24]
    x = torch.stack([torch.from_numpy(np.asarray(it.image)).permute(2, 0, 1) for it in items])
    eager = build_predictor(str(tiny_run["ckpt"]), precision="bf16")
    path, meta = export(eager, tmp_path / "model_bf16.pt")
    assert meta["precision"] == "bf16"
    assert next(eager.net.parameters()).dtype == torch.float32  # the predictor's network is not converted
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        out = loaded(x)
        ref = torch.jit.load(str(export(build_predictor(str(tiny_run["ckpt"])), tmp_path / "model.pt")[0]))(x)
    assert out["cell_prob"].dtype == torch.float32 and out["latlng"].dtype == torch.float32
    # the export's tensor resize differs from PIL's, and bf16 weights from bf16 autocast: both within 0.05
    assert (out["cell_prob"] - ref["cell_prob"]).abs().max() < 0.05
    via_pil = eager.forward([it.image for it in items])["cell_prob"]
    assert np.abs(out["cell_prob"].numpy() - via_pil).max() < 0.05
    assert ExportedPredictor(path).describe()["precision"] == "bf16"


def test_bf16_training_on_cpu_uses_explicit_attention_with_the_same_gradients():
    """In bf16 on a CPU the timm attention layers are switched to the explicit form (the fused kernel's backward
    is slow there); in float32, or on another device, nothing changes; gradients agree with the fused path."""
    import timm

    from geoloc.precision import training_attention

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=2)
    attn = [m for m in vit.modules() if hasattr(m, "fused_attn")]
    assert attn and all(m.fused_attn for m in attn)
    assert training_attention(vit, "32-true", "cpu") == [] and training_attention(vit, "bf16-mixed", "cuda:0") == []
    assert all(m.fused_attn for m in attn)
    x = torch.randn(4, 3, 32, 32)

    def grads():
        vit.zero_grad()
        with autocast("bf16", "cpu"):
            out = vit(x)
        out.float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in vit.parameters()])

    fused = grads()
    switched = training_attention(vit, "bf16-mixed", "cpu")
    assert len(switched) == len(attn) and not any(m.fused_attn for m in attn)
    explicit = grads()
    assert torch.linalg.vector_norm(explicit - fused) / torch.linalg.vector_norm(fused) < 0.05


class AttentionProbe:
    """A Lightning callback (built by train.py from ``callbacks``) that records the attention layers' mode."""

    seen: list = []

    def __new__(cls):
        import pytorch_lightning as pl

        class Probe(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                AttentionProbe.seen.append([m.fused_attn for m in pl_module.modules() if hasattr(m, "fused_attn")])

        return Probe()


def test_fitting_in_bf16_trains_explicit_attention_and_gives_back_fused_layers(tmp_path):
    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no bfloat16 units")
    from .conftest import _train_tiny

    AttentionProbe.seen.clear()
    out = _train_tiny(tmp_path, "trainer.precision=bf16-mixed",
                      "+callbacks.probe._target_=tests.test_precision.AttentionProbe")
    assert AttentionProbe.seen and all(not any(s) for s in AttentionProbe.seen)  # every step: explicit
    net = out["objects"]["model"]
    assert all(m.fused_attn for m in net.modules() if hasattr(m, "fused_attn"))


def test_compiled_bf16_prediction_runs_a_frozen_bfloat16_copy_and_answers_as_eager_bf16(tiny_run):
    """compile=true with bf16 on a CPU compiles a bfloat16 copy of the network (weights frozen), leaving the
    predictor's network in float32; its outputs are float32 and agree with eager bf16 autocast."""
    from geoloc.data.images import SkipReport
    from geoloc.data.readers import read_sample
    from geoloc.inference.predictor import build_predictor

    images = [it.image for it in read_sample(tiny_run["sample"], split="test", n_images=240).iter_items(SkipReport())]
    eager = build_predictor(str(tiny_run["ckpt"]), precision="bf16")
    compiled = build_predictor(str(tiny_run["ckpt"]), precision="bf16", compile=True)
    assert next(compiled.net.parameters()).dtype == torch.float32
    a, b = eager.forward(images), compiled.forward(images)
    assert all(b[k].dtype == np.float32 for k in b)
    assert (a["cell_prob"].argmax(1) == b["cell_prob"].argmax(1)).mean() >= 0.9
    assert np.abs(a["cell_prob"] - b["cell_prob"]).max() < 0.05
