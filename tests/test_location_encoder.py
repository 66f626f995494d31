"""The GPS encoder: equal to GeoCLIP's own (with its released weights), Equal Earth golden values,
gradients, seeding and strict weight loading."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from geoloc.models.location_encoder import (
    GEOCLIP_CONFIG,
    LocationEncoder,
    RandomFourierFeatures,
    equal_earth,
    geoclip_key_map,
    geoclip_weights_path,
    load_geoclip_weights,
)

GEOCLIP_SPEC = importlib.util.find_spec("geoclip")
needs_geoclip = pytest.mark.skipif(GEOCLIP_SPEC is None, reason="the geoclip package is not installed")

TINY = {"sigmas": (1, 16), "n_frequencies": 16, "hidden": 32, "depth": 2, "dim": 16}

# Equal Earth on the unit sphere (Šavrič et al. 2018; PROJ's eqearth): y at the poles, x at (0, 180).
EQEARTH_MAX_Y = 1.3173627591574
EQEARTH_MAX_X = 2.7066299836961
GEOCLIP_SCALE = 66.50336 / 180


def tiny(seed: int = 0) -> LocationEncoder:
    return LocationEncoder(**TINY, seed=seed)


def sample_latlng(n_random: int = 4000) -> torch.Tensor:
    """``[n_random + 38, 2]`` float32: uniform on the sphere, plus poles, the antimeridian and the origin."""
    g = torch.Generator().manual_seed(1234)
    lat = torch.rad2deg(torch.asin(2 * torch.rand(n_random, generator=g, dtype=torch.float64) - 1))
    lng = 360 * torch.rand(n_random, generator=g, dtype=torch.float64) - 180
    special = [(90.0, 0.0), (-90.0, 0.0), (90.0, 180.0), (-90.0, -180.0), (89.9999, 45.0), (-89.9999, -135.0),
               (0.0, 0.0), (0.0, 180.0), (0.0, -180.0), (0.0, 179.9999), (0.0, -179.9999)]
    special += [(lat_, s * 180.0) for lat_ in (-75.0, -45.0, -10.0, 10.0, 45.0, 75.0) for s in (1, -1)]
    special += [(lat_, s * 179.99) for lat_ in (-60.0, -30.0, 0.5, 30.0, 60.0, 66.5) for s in (1, -1)]
    special += [(51.5, -0.001), (51.5, 0.001), (-33.9, 18.4)]
    return torch.cat([torch.stack([lat, lng], dim=1), torch.tensor(special, dtype=torch.float64)]).float()




# --- GeoCLIP's own encoder, loaded from its files -----------------------------------------------------------


@pytest.fixture(scope="module")
def geoclip_module():
    """GeoCLIP's ``model/location_encoder.py`` as a module, without running ``geoclip/__init__``.

    ``import geoclip`` imports ``transformers`` (slow, and not needed here). Registering ``geoclip/model`` as a bare
    package of a private name lets its relative imports (``.misc``, ``.rff``) resolve from its own folder.
    """
    if GEOCLIP_SPEC is None:
        pytest.skip("the geoclip package is not installed")
    name = "_geoclip_model_under_test"
    package = types.ModuleType(name)
    package.__path__ = [str(Path(GEOCLIP_SPEC.submodule_search_locations[0]) / "model")]
    sys.modules[name] = package
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script in geoclip's rff
            yield importlib.import_module(f"{name}.location_encoder")
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


@pytest.fixture(scope="module")
def pretrained_pair(geoclip_module):
    """(GeoCLIP's encoder, ours), both with GeoCLIP's released weights, in eval mode."""
    theirs = geoclip_module.LocationEncoder(from_pretrained=False)
    theirs.load_state_dict(torch.load(geoclip_weights_path(), map_location="cpu", weights_only=True))
    ours = LocationEncoder.from_geoclip()
    return theirs.eval(), ours.eval()


@needs_geoclip
def test_equals_geoclip_with_released_weights(pretrained_pair):
    theirs, ours = pretrained_pair
    latlng = sample_latlng()
    with torch.no_grad():
        expected = theirs(latlng)
        got = ours(latlng)
    assert got.shape == expected.shape == (len(latlng), 512)
    assert torch.isfinite(got).all()
    assert expected.norm(dim=1).min() > 0.01  # (norms are ~0.3: the tolerance below is ~1e-4 relative)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"max abs difference from GeoCLIP is {diff:.3g}"


@needs_geoclip
def test_released_weights_separate_near_from_far(pretrained_pair):
    _, ours = pretrained_pair
    paris, paris_1km, sydney = [48.8566, 2.3522], [48.8656, 2.3522], [-33.8688, 151.2093]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(ours(torch.tensor([paris, paris_1km, sydney])), dim=1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1


@needs_geoclip
def test_equals_geoclip_after_key_map_of_random_weights(geoclip_module, tmp_path):
    """The key map alone (no released file): GeoCLIP's randomly initialized state, saved and loaded."""
    torch.manual_seed(7)
    theirs = geoclip_module.LocationEncoder(from_pretrained=False).eval()
    torch.save(theirs.state_dict(), tmp_path / "random.pth")
    ours = load_geoclip_weights(LocationEncoder(**GEOCLIP_CONFIG, seed=3), tmp_path / "random.pth").eval()
    latlng = sample_latlng(n_random=200)
    with torch.no_grad():
        torch.testing.assert_close(ours(latlng), theirs(latlng), rtol=0, atol=1e-5)


@needs_geoclip
def test_equal_earth_matches_geoclip(geoclip_module):
    # Close is not enough for the embeddings (sigma=256 amplifies rounding): they are compared above.
    latlng = sample_latlng()
    torch.testing.assert_close(equal_earth(latlng), geoclip_module.equal_earth_projection(latlng),
                               rtol=0, atol=1e-6)


def test_fourier_features_match_geoclip_formula():
    """Order and scale as GeoCLIP's ``gaussian_encoding``: ``cat(cos(2 pi v B^T), sin(2 pi v B^T))``."""
    rff = RandomFourierFeatures(sigma=4.0, n_frequencies=8, generator=torch.Generator().manual_seed(0))
    v = torch.randn(5, 2, dtype=torch.float64)
    rff = rff.double()
    vp = 2 * math.pi * v @ rff.b.T
    torch.testing.assert_close(rff(v), torch.cat([torch.cos(vp), torch.sin(vp)], dim=-1))
    assert rff.out_features == 16 and rff.b.shape == (8, 2)


# --- Equal Earth golden values --------------------------------------------------------------------------------


def equal_earth_reference(lat_deg: float, lng_deg: float) -> tuple[float, float]:
    """Independent transcription in plain float64 math, from Šavrič et al. 2018 (unit sphere, unscaled)."""
    a1, a2, a3, a4 = 1.340264, -0.081106, 0.000893, 0.003796
    theta = math.asin(math.sqrt(3) / 2 * math.sin(math.radians(lat_deg)))
    x = 2 * math.sqrt(3) * math.radians(lng_deg) * math.cos(theta) / (
        3 * (9 * a4 * theta**8 + 7 * a3 * theta**6 + 3 * a2 * theta**2 + a1))
    y = a4 * theta**9 + a3 * theta**7 + a2 * theta**3 + a1 * theta
    return x, y


@pytest.mark.parametrize(
    ("latlng", "expected_unit_sphere"),
    [
        ((0.0, 0.0), (0.0, 0.0)),
        ((90.0, 0.0), (0.0, EQEARTH_MAX_Y)),
        ((-90.0, 0.0), (0.0, -EQEARTH_MAX_Y)),
        ((0.0, 180.0), (EQEARTH_MAX_X, 0.0)),
        ((0.0, -180.0), (-EQEARTH_MAX_X, 0.0)),
    ],
)
def test_equal_earth_golden(latlng, expected_unit_sphere):
    got = equal_earth(torch.tensor([latlng], dtype=torch.float64))[0]
    expected = torch.tensor(expected_unit_sphere, dtype=torch.float64) * GEOCLIP_SCALE
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_equal_earth_equator_spans_unit_interval():
    """GeoCLIP's scale makes x run over [-1, 1] along the equator (to 7 digits)."""
    x = equal_earth(torch.tensor([[0.0, 180.0], [0.0, -180.0]], dtype=torch.float64))[:, 0]
    torch.testing.assert_close(x, torch.tensor([1.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-7)


def test_equal_earth_against_plain_math_and_symmetries():
    latlng = sample_latlng(n_random=500).double()
    got = equal_earth(latlng)
    expected = torch.tensor([equal_earth_reference(*p) for p in latlng.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected * GEOCLIP_SCALE, rtol=0, atol=1e-12)
    flip_lng = equal_earth(latlng * torch.tensor([1.0, -1.0], dtype=torch.float64))
    flip_lat = equal_earth(latlng * torch.tensor([-1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(flip_lng, got * torch.tensor([-1.0, 1.0], dtype=torch.float64))  # x odd in lng
    torch.testing.assert_close(flip_lat, got * torch.tensor([1.0, -1.0], dtype=torch.float64))  # y odd in lat
    assert got.dtype == torch.float64 and got.shape == latlng.shape


def test_equal_earth_is_equal_area():
    """|det d(x, y) / d(lat, lng)| / cos(lat) is the same everywhere (equal-area), away from the poles."""
    points = torch.tensor([[0.0, 0.0], [30.0, -100.0], [-55.0, 170.0], [80.0, 10.0], [-89.0, -179.0]],
                          dtype=torch.float64)
    ratios = []
    for p in points:
        jac = torch.autograd.functional.jacobian(lambda q: equal_earth(q[None])[0], p)  # [2 out, 2 in]
        ratios.append(torch.linalg.det(jac).abs() / torch.cos(torch.deg2rad(p[0])))
    ratios = torch.stack(ratios)
    torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-9, atol=0)


# --- shapes, gradients, seeding --------------------------------------------------------------------------------


def test_shapes_and_dtypes():
    enc = tiny()
    assert enc.out_features == 16 and len(enc.capsules) == 2
    latlng = sample_latlng(n_random=100)
    out = enc(latlng)
    assert out.shape == (len(latlng), 16) and out.dtype == torch.float32
    assert enc(torch.tensor([[10, 20]])).dtype == torch.float32  # integer degrees are accepted
    assert enc.double()(torch.tensor([[10.0, 20.0]], dtype=torch.float64)).dtype == torch.float64
    assert tiny()(torch.zeros(0, 2)).shape == (0, 16)


def test_default_widths_are_geoclip():
    enc = LocationEncoder()
    assert enc.sigmas == (1.0, 16.0, 256.0) and enc.out_features == 512
    assert enc.capsules[0].rff.b.shape == (256, 2)
    assert [m.weight.shape for m in enc.capsules[0].mlp[::2]] == [(1024, 512), (1024, 1024), (1024, 1024)]
    assert enc.capsules[0].head.weight.shape == (512, 1024)


@pytest.mark.parametrize("shape", [(5,), (5, 3), (2, 5, 2)])
def test_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        tiny()(torch.zeros(shape))


def test_gradient_reaches_weights_not_fourier_matrix():
    enc = tiny()
    latlng = sample_latlng(n_random=64)
    enc(latlng).square().sum().backward()
    for capsule in enc.capsules:
        assert not capsule.rff.b.requires_grad and capsule.rff.b.grad is None
        for layer in (*capsule.mlp[::2], capsule.head):
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    names = {name for name, _ in enc.named_parameters()}
    assert not any(name.endswith("rff.b") for name in names)  # no optimizer will see B...
    assert {f"capsules.{i}.rff.b" for i in range(2)} <= set(enc.state_dict())  # ...but checkpoints keep it


def test_fourier_matrix_follows_to():
    enc = tiny().to(torch.float64)
    assert enc.capsules[0].rff.b.dtype == torch.float64


def test_seed_determines_the_encoder():
    torch.manual_seed(1)
    a = tiny(seed=5).state_dict()
    torch.manual_seed(2)  # the global generator must not matter
    b = tiny(seed=5).state_dict()
    c = tiny(seed=6).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["capsules.0.rff.b"], c["capsules.0.rff.b"])
    assert not torch.equal(a["capsules.0.mlp.0.weight"], c["capsules.0.mlp.0.weight"])
    # each scale draws its own matrix, with the right spread
    big = LocationEncoder(sigmas=(1, 256), n_frequencies=4096, hidden=4, depth=1, dim=4)
    b0, b1 = big.capsules[0].rff.b, big.capsules[1].rff.b
    assert abs(b0.std().item() - 1) < 0.05 and abs(b1.std().item() / 256 - 1) < 0.05
    assert not torch.equal(b0 * 256, b1)


def test_tiny_encoder_for_cpu_tests():
    enc = tiny()
    assert sum(p.numel() for p in enc.parameters()) < 10_000
    latlng = sample_latlng(n_random=20_000)
    with torch.no_grad():
        out = enc(latlng)
    assert out.shape == (len(latlng), enc.out_features) and torch.isfinite(out).all()


# --- strict loading -------------------------------------------------------------------------------------------


def geoclip_style_state(encoder: LocationEncoder) -> dict[str, torch.Tensor]:
    """``encoder``'s state under GeoCLIP's key names (the inverse of the key map)."""
    ours = encoder.state_dict()
    return {k: ours[v].clone() for k, v in geoclip_key_map(encoder).items()}


def test_key_map_covers_state_dict_one_to_one():
    enc = LocationEncoder(**GEOCLIP_CONFIG)
    key_map = geoclip_key_map(enc)
    assert len(key_map) == 27 and sorted(key_map.values()) == sorted(enc.state_dict())
    assert key_map["LocEnc0.capsule.0.b"] == "capsules.0.rff.b"
    assert key_map["LocEnc1.capsule.5.weight"] == "capsules.1.mlp.4.weight"
    assert key_map["LocEnc2.head.0.bias"] == "capsules.2.head.bias"


def test_load_round_trip(tmp_path):
    torch.save(geoclip_style_state(tiny(seed=1)), tmp_path / "w.pth")
    loaded = load_geoclip_weights(tiny(seed=2), tmp_path / "w.pth")
    latlng = sample_latlng(n_random=50)
    torch.testing.assert_close(loaded(latlng), tiny(seed=1)(latlng), rtol=0, atol=0)


def test_load_rejects_wrong_key(tmp_path):
    state = geoclip_style_state(tiny())
    state["LocEnc1.capsule.9.weight"] = state.pop("LocEnc1.capsule.3.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match="renamed.pth") as err:
        load_geoclip_weights(tiny(), tmp_path / "renamed.pth")
    assert "missing key 'LocEnc1.capsule.3.weight'" in str(err.value)
    assert "unexpected key 'LocEnc1.capsule.9.weight'" in str(err.value)


def test_load_rejects_wrong_shape(tmp_path):
    state = geoclip_style_state(tiny())
    state["LocEnc0.head.0.weight"] = torch.zeros(8, 32)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"'LocEnc0\.head\.0\.weight' is \(8, 32\), expected \(16, 32\)"):
        load_geoclip_weights(tiny(), tmp_path / "shape.pth")


@needs_geoclip
def test_released_weights_need_geoclip_architecture():
    with pytest.raises(ValueError, match="location_encoder_weights.pth") as err:
        load_geoclip_weights(tiny())
    assert "unexpected key 'LocEnc2.capsule.0.b'" in str(err.value)


def test_missing_geoclip_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "geoclip"
                        else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="'geoclip' package"):
        LocationEncoder.from_geoclip()


def test_construction_reads_nothing(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("torch.load called while constructing")

    monkeypatch.setattr(torch, "load", no_load)
    LocationEncoder(**TINY)
