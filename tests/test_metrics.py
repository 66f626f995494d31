import math

import numpy as np
import pytest
import torch

from geoloc.metrics import (
    METRIC_KEYS,
    country_accuracy,
    distance_metrics,
    geolocation_metrics,
    geoscore,
)


def test_hand_computed_case():
    d = np.array([0.5, 1.0, 24.0, 200.0, 200.01, 800.0, 3000.0, 10.0])
    m = distance_metrics(d)
    assert m["n"] == 8
    assert m["acc_1km"] == pytest.approx(100 * 2 / 8)  # 0.5 and exactly 1.0 (hit is <=)
    assert m["acc_25km"] == pytest.approx(100 * 4 / 8)
    assert m["acc_200km"] == pytest.approx(100 * 5 / 8)  # 200.0 counts, 200.01 does not
    assert m["acc_750km"] == pytest.approx(100 * 6 / 8)
    assert m["acc_2500km"] == pytest.approx(100 * 7 / 8)
    assert m["median_km"] == pytest.approx((24.0 + 200.0) / 2)
    assert m["mean_km"] == pytest.approx(d.sum() / 8)
    want_gs = sum(5000 * math.exp(-x / 1492.7) for x in d) / 8
    assert m["geoscore"] == pytest.approx(want_gs)
    assert set(METRIC_KEYS) <= set(m)


def test_geoscore_golden():
    np.testing.assert_allclose(geoscore([0.0, 1492.7, 2 * 1492.7]), [5000.0, 5000 / math.e, 5000 / math.e**2])


def test_from_coordinates_and_torch():
    true = np.array([[48.8566, 2.3522], [40.7128, -74.0060]])
    pred = np.array([[48.8566, 2.3522], [34.0522, -118.2437]])  # exact; NY -> LA (~3936 km)
    m = geolocation_metrics(pred, true)
    assert m["acc_1km"] == 50.0 and m["acc_2500km"] == 50.0
    assert m["median_km"] == pytest.approx(3936.0 / 2, rel=0.003)
    mt = geolocation_metrics(torch.tensor(pred), torch.tensor(true))
    assert mt == pytest.approx(m)


def test_empty_and_nan():
    m = distance_metrics(np.array([]))
    assert m["n"] == 0 and math.isnan(m["acc_25km"])
    with pytest.raises(ValueError, match="NaN"):
        distance_metrics(np.array([1.0, np.nan]))


def test_country_accuracy_counts_only_known():
    out = country_accuracy(["FRA", "USA", "", None, "JPN"], ["FRA", "CAN", "USA", "JPN", np.nan])
    assert out == {"acc_country": 50.0, "n_country": 2}
    assert math.isnan(country_accuracy([""], ["FRA"])["acc_country"])
