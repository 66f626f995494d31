"""GeoCLIP's released model inside geoloc: the same answers as the geoclip package's own code on the same
weights, CLIP weights from either format, the cell distribution, export, fine-tuning, and other systems' files.

No CLIP weights can be downloaded here, so every test gives both sides the same *random* CLIP tower: what is
shown is that the code paths agree, never an accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from .conftest import REPO

SMALL = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
TIMM_SMALL = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0)
N_GALLERY = 10_000  # a seeded subset of the 100K gallery keeps the fast test fast; the bench runs all of it


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A small random Hugging Face CLIPModel (GeoCLIP's class) at CLIP-L's patch size and 768-d projection,
    saved as the safetensors file a user would download."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(projection_dim=768, vision_config=dict(**SMALL, patch_size=14, image_size=224, projection_dim=768),
                     text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                      projection_dim=768, bos_token_id=0, eos_token_id=2))
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp("clip") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture(scope="module")
def gallery_latlng():
    from geoloc.data.geography import mp16_gallery_latlng

    all_points = mp16_gallery_latlng()
    return all_points[np.random.default_rng(0).choice(len(all_points), N_GALLERY, replace=False)]


@pytest.fixture(scope="module")
def photos():
    from PIL import Image

    from .conftest import SHARED_DATA

    folder = SHARED_DATA / "im2gps3k-dev" / "images"
    if not folder.is_dir():
        pytest.skip(f"real photos not found at {folder} (set GEOLOC_SHARED_DATA)")
    paths = sorted(folder.glob("*.jpg"))[:8]
    return paths, [Image.open(p).convert("RGB") for p in paths]


def _theirs(hf_model, gallery_latlng):
    """GeoCLIP's own model (the geoclip package's classes and forward), with the given CLIP tower and the
    released MLP, GPS encoder and logit scale."""
    from geoclip.model.GeoCLIP import GeoCLIP
    from geoclip.model.image_encoder import ImageEncoder
    from geoclip.model.location_encoder import LocationEncoder
    from transformers import CLIPImageProcessor

    from geoloc.models.geoclip import geoclip_weights_file

    enc = ImageEncoder.__new__(ImageEncoder)  # its constructor would build (or download) the full CLIP-L
    nn.Module.__init__(enc)
    enc.CLIP, enc.image_processor = hf_model, CLIPImageProcessor()
    enc.mlp = nn.Sequential(nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 512))
    enc.mlp.load_state_dict(torch.load(geoclip_weights_file("image_encoder_mlp_weights.pth"), weights_only=True))
    g = GeoCLIP.__new__(GeoCLIP)
    nn.Module.__init__(g)
    g.image_encoder, g.location_encoder = enc, LocationEncoder(from_pretrained=True)
    g.logit_scale = nn.Parameter(torch.load(geoclip_weights_file("logit_scale_weights.pth"), weights_only=True))
    g.register_buffer("gps_gallery", torch.tensor(gallery_latlng, dtype=torch.float32), persistent=False)
    return g.eval()


@pytest.fixture(scope="module")
def ours(hf_clip, gallery_latlng, tmp_path_factory):
    from geoloc.inference.geoclip import build_geoclip_predictor

    _, path = hf_clip
    cache = tmp_path_factory.mktemp("geoclip_cache") / "gallery.npz"
    return build_geoclip_predictor(path, clip_kwargs=TIMM_SMALL, gallery_latlng=gallery_latlng, gallery_cache=cache,
                                   topk=3)


@pytest.mark.shared_data
def test_the_same_answers_as_geoclips_own_model(hf_clip, ours, gallery_latlng, photos):
    """Same random CLIP tower, released MLP, GPS encoder and logit scale: GeoCLIP's code and geoloc's give
    the same image embeddings, gallery probabilities and best gallery point on real photos."""
    hf_model, _ = hf_clip
    theirs = _theirs(hf_model, gallery_latlng)
    paths, images = photos
    x_theirs = torch.cat([theirs.image_encoder.preprocess_image(im) for im in images])
    x_ours = torch.stack([ours.transform(im) for im in images])
    assert torch.equal(x_theirs, x_ours)  # GeoCLIP's CLIP preprocessing, reproduced exactly
    with torch.no_grad():
        emb_theirs = theirs.image_encoder(x_theirs)
        logits = theirs(x_theirs, theirs.gps_gallery)
        out = ours.net(x_ours)
    rel = (out["image_emb"] - emb_theirs).norm(dim=1) / emb_theirs.norm(dim=1)
    assert rel.max() <= 1e-5, rel
    p_theirs = logits.softmax(-1).numpy()
    g = ours.model.gallery
    scale = 1.0 / ours.scorer("gallery").temperature
    emb = torch.nn.functional.normalize(out["image_emb"], dim=-1).numpy()
    p_ours = torch.from_numpy(scale * emb @ g.embeddings.T).double().softmax(-1).numpy()
    assert np.abs(p_ours - p_theirs).max() <= 1e-5
    assert np.array_equal(p_ours.argmax(1), p_theirs.argmax(1))
    pred = ours.predict(images, [p.name for p in paths])
    np.testing.assert_allclose(pred.latlng, gallery_latlng[p_theirs.argmax(1)], atol=1e-4)
    # the cell distribution is the gallery mass per cell
    cell_of = ours.cells.assign(gallery_latlng)
    mass = np.stack([np.bincount(cell_of, weights=p, minlength=len(ours.cells)) for p in p_theirs])
    assert np.abs(pred.cell_prob - mass).max() <= 1e-5
    # and GeoCLIP's own predict() names the same best point for a photo
    top_gps, top_prob = theirs.predict(str(paths[0]), top_k=1)
    np.testing.assert_allclose(pred.latlng[0], top_gps[0].numpy(), atol=1e-4)


def test_hugging_face_clip_weights_convert_to_timm(hf_clip):
    """A CLIPModel state dict (what GeoCLIP loads) gives timm's QuickGELU ViT the same projected features."""
    from geoloc.models.clip import CLIP_L14_TIMM, hf_clip_vision_to_timm
    from geoloc.models.image_encoder import ImageEncoder

    hf_model, path = hf_clip
    enc = ImageEncoder(CLIP_L14_TIMM, num_classes=768, weights=str(path), preprocess="clip", **TIMM_SMALL).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = enc(x), hf_model.get_image_features(pixel_values=x)
    b = b if isinstance(b, torch.Tensor) else b.pooler_output
    assert ((a - b).norm(dim=1) / b.norm(dim=1)).max() <= 1e-5
    assert set(hf_clip_vision_to_timm(hf_model.state_dict())) == set(enc.model.state_dict())
    assert enc.data_config["preprocess"] == "clip" and enc.num_features == 768


@pytest.mark.slow
def test_the_converter_on_full_size_clip_l14():
    """The full-size CLIP ViT-L/14 image tower (random weights, CLIPVisionModelWithProjection layout):
    every tensor maps one to one and the outputs agree."""
    transformers = pytest.importorskip("transformers")
    import timm

    from geoloc.models.clip import CLIP_L14_TIMM, to_timm_layout

    cfg = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768)
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    model = timm.create_model(CLIP_L14_TIMM, pretrained=False, num_classes=768).eval()
    state = to_timm_layout(hf.state_dict(), model)
    mine = model.state_dict()
    assert set(state) == set(mine) and all(state[k].shape == mine[k].shape for k in mine)
    model.load_state_dict(state)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(x), hf(pixel_values=x).image_embeds
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    del hf, model, state


def test_missing_clip_weights_say_what_to_download_and_never_hang(tmp_path, monkeypatch):
    from geoloc.models.clip import locate_weights
    from geoloc.models.geoclip import clip_image_encoder

    with pytest.raises(FileNotFoundError, match="(?s)openai/clip-vit-large-patch14.*clip_weights=/path"):
        clip_image_encoder(None)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        locate_weights(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder without model.safetensors"):
        locate_weights(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        locate_weights("openai/clip-vit-large-patch14")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        locate_weights("openai/clip-vit-large-patch14")
    assert time.perf_counter() - t < 10  # no retries against a missing network
    bad = tmp_path / "bad.bin"
    torch.save({"foo": torch.zeros(2)}, bad)
    from geoloc.models.image_encoder import ImageEncoder

    with pytest.raises(ValueError, match="not CLIP image-tower weights"):
        ImageEncoder("vit_large_patch14_clip_quickgelu_224", num_classes=768, weights=str(bad), **TIMM_SMALL)


def test_geoclip_predict_without_weights_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "geoloc.inference.cli", "x.jpg", "--model", "geoclip"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "clip-vit-large-patch14" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.shared_data
def test_geoclip_through_evaluate_and_the_reasoning_chain(ours, photos, tmp_path):
    """Cell metrics, Recall-vs-Area, calibration and the chain's region stage work for GeoCLIP."""
    from geoloc.data.readers import read_im2gps
    from geoloc.evaluation.engine import evaluate

    ds = read_im2gps(photos[0][0].parent.parent, name="im2gps3k-dev")
    ds = ds.subset(np.arange(len(ds)) < 16)
    m = evaluate(ds, ours, tmp_path / "eval", batch_size=8, progress=False)
    assert m["n"] == 16 and {"acc_cell_top1", "ece_top1", "recall_area_auc"} <= set(m)
    assert m["predictor"]["kind"] == "geoclip"
    from geoloc.evidence.verbalize import explain

    out = ours.forward(photos[1][:2])
    chain = explain(out, ours.refine_batch(out), ours.cells, refine=ours.refine)[0]
    assert [s["stage"] for s in chain["stages"]] == ["region"] and "summed over its geocells" in chain["text"]


@pytest.mark.shared_data
def test_geoclip_exports_to_torchscript(ours, photos, tmp_path):
    from geoloc.inference.export import exported_from_predictor, script

    module, meta = exported_from_predictor(ours)
    scripted = script(module)
    images = photos[1][:3]
    pred = ours.predict(images, ["a", "b", "c"])
    for i, im in enumerate(images):
        x = torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None]
        with torch.no_grad():
            out = scripted(x)
        # the exported preprocessing resizes in float where the CLIP processor resizes the uint8 image
        assert np.abs(out["cell_prob"][0].numpy() - pred.cell_prob[i]).max() < 0.05
    assert meta["num_cells"] == len(ours.cells)


def test_fine_tuning_from_geoclip_starts_from_its_weights(tiny_run, tmp_path):
    """experiment=geoclip_finetune with a small random CLIP tower: GeoCLIP's MLP and GPS encoder at the start,
    the tower frozen, geoloc's joint objective trained, and the run reloads."""
    from hydra import compose, initialize_config_dir

    from geoloc.models.geoclip import load_geoclip_image_mlp
    from geoloc.models.loading import load_checkpoint
    from geoloc.models.location_encoder import LocationEncoder
    from train import train

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=geoclip_finetune", "backbone.weights=null", "backbone.trainable_blocks=1",
            *[f"+backbone.{k}={v}" for k, v in TIMM_SMALL.items()], f"cells={tiny_run['cells']}",
            f"data.root={tiny_run['sample']}", "data.n_images=240", f"output_dir={tmp_path / 'run'}", "batch_size=8",
            "num_workers=0", "trainer.max_steps=3", "+trainer.limit_val_batches=1", "logger=none",
            "trainer.enable_progress_bar=false", "model.module.queue_size=32"])
    net_cfg = cfg.model.net
    import hydra

    net = hydra.utils.instantiate(net_cfg, num_cells=5)
    mlp = load_geoclip_image_mlp(nn.Sequential(nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 512)))
    assert all(torch.equal(a, b) for a, b in zip(net.image_proj.state_dict().values(), mlp.state_dict().values()))
    ref = LocationEncoder.from_geoclip()
    assert all(torch.equal(a, b) for a, b in zip(net.location_encoder.state_dict().values(),
                                                 ref.state_dict().values()))
    trainable = {n.split(".")[1] for n, p in net.image_encoder.named_parameters() if p.requires_grad}
    assert trainable <= {"blocks", "norm", "head"} and "patch_embed" not in trainable
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and objects["trainer"].global_step == 3
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert loaded.net.image_encoder.num_features == 768 and loaded.data_config["preprocess"] == "clip"


# --------------------------------------------------------------------------- predictor=file


def test_another_systems_answers_score_like_geolocs_own(tmp_path):
    """predictor=file on a hand-written CSV reproduces metrics computed independently; unanswered photos
    count as failures by default, or are left out."""
    import pandas as pd

    from geoloc.data.readers import read_latlng_csv
    from geoloc.evaluation.engine import UNANSWERED_KM, evaluate
    from geoloc.evaluation.metrics import geoscore
    from geoloc.geo import haversine_km
    from geoloc.inference.baselines import read_predictions_file

    truth = np.array([[48.8566, 2.3522], [40.7128, -74.0060], [35.6762, 139.6503], [-33.8688, 151.2093]])
    (tmp_path / "bench.csv").write_text("path,lat,lng\n" + "".join(f"p{i}.jpg,{a},{b}\n" for i, (a, b) in
                                                                     enumerate(truth)))
    ds = read_latlng_csv(tmp_path / "bench.csv")
    ds.table["path"] = None  # coordinates only: a file predictor needs no photo
    answers = np.array([[48.85, 2.35], [51.5074, -0.1278], [35.0, 139.0]])  # p3.jpg has no answer
    (tmp_path / "answers.csv").write_text("image,LATITUDE,lon\n" + "".join(
        f"p{i}.jpg,{a},{b}\n" for i, (a, b) in enumerate(answers)) + "p3.jpg,,\n")
    pred = read_predictions_file(tmp_path / "answers.csv", id_column="image", lat_column="latitude", lng_column="lon")
    m = evaluate(ds, pred, tmp_path / "out", progress=False)
    d = np.r_[haversine_km(truth[:3], answers), UNANSWERED_KM]
    assert m["n"] == 4 and m["n_unanswered"] == 1
    assert m["acc_25km"] == pytest.approx(25.0) and m["acc_750km"] == pytest.approx(50.0)
    assert m["median_km"] == pytest.approx(np.median(d)) and m["geoscore"] == pytest.approx(geoscore(d).mean())
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert rows["pred_lat"].isna().sum() == 1 and rows["distance_km"].max() == pytest.approx(UNANSWERED_KM)
    skip = read_predictions_file(tmp_path / "answers.csv", id_column="image", lat_column="latitude",
                                 lng_column="lon", unanswered="skip")
    m2 = evaluate(ds, skip, tmp_path / "out2", progress=False)
    assert m2["n"] == 3 and m2["n_skipped"] == 1 and m2["skipped_by_reason"] == {"unanswered": 1}
    assert m2["median_km"] == pytest.approx(np.median(d[:3]))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["predictor"]["kind"] == "file"


def test_a_bad_answers_file_names_the_line(tmp_path):
    from geoloc.inference.baselines import read_predictions_file

    (tmp_path / "a.csv").write_text("IMG_ID,lat,lng\nx,10,20\nx,11,21\n")
    with pytest.raises(ValueError, match=r"a.csv: image id 'x' is answered on several lines \[2, 3\]"):
        read_predictions_file(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("IMG_ID,lat,lng\nx,10,200\n")
    with pytest.raises(ValueError, match=r"row 2 \(x\): lat=10.0, lng=200.0"):
        read_predictions_file(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("IMG_ID,latitude,lng\nx,10,20\n")
    with pytest.raises(ValueError, match="no column 'lat'"):
        read_predictions_file(tmp_path / "c.csv")
