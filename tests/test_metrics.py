import math

import numpy as np
import pytest
import torch

from geoloc.evaluation.metrics import (
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


def test_cell_ranking_area_to_cover_golden():
    from geoloc.evaluation.metrics import cell_ranking

    prob = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    area = np.array([10.0, 100.0, 1000.0])
    r = cell_ranking(prob, np.array([0, 2, 1]), area)
    assert r["true_rank"].tolist() == [1, 3, 2]
    assert r["area_to_cover_km2"].tolist() == [10.0, 1110.0, 1110.0]  # ties count as covered
    assert r["top1_cell"].tolist() == [0, 0, 2] and np.allclose(r["top1_prob"], [0.5, 0.5, 0.6])


def test_recall_vs_area_and_auc():
    from geoloc.evaluation.metrics import EARTH_AREA_KM2, recall_area_auc, recall_vs_area

    grid, recall = recall_vs_area(np.array([10.0, 1000.0, 1e6, 1e6]), areas_km2=[1, 10, 999, 1000, 1e7])
    assert recall.tolist() == [0.0, 0.25, 0.25, 0.5, 1.0]
    assert recall_area_auc(np.array([1.0])) == 1.0  # covered at the smallest area
    assert recall_area_auc(np.array([EARTH_AREA_KM2 * 2])) == 0.0
    assert abs(recall_area_auc(np.array([np.sqrt(EARTH_AREA_KM2)])) - 0.5) < 0.01  # middle of the log axis


def test_expected_calibration_error_golden():
    from geoloc.evaluation.metrics import expected_calibration_error

    # bins of width 0.5: [0.2, 0.4] -> conf 0.3, acc 0.5; [0.9, 1.0] -> conf 0.95, acc 0.5
    out = expected_calibration_error([0.2, 0.4, 0.9, 1.0], [1, 0, 1, 0], n_bins=2)
    assert np.isclose(out["ece"], 0.5 * 0.2 + 0.5 * 0.45)
    assert [b["n"] for b in out["bins"]] == [2, 2]
    assert expected_calibration_error([0.8] * 10, [1] * 8 + [0] * 2)["ece"] < 1e-12  # calibrated
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        expected_calibration_error([1.5], [1])
