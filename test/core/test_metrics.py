"""Evaluation metrics against hand-computed values."""

import math

import numpy as np
import pytest

from geozoom_ros.eval.metrics import (average_precision, chance_recall, chance_step_accuracy,
                                      error_en, error_m, gate_curve, gate_thresholds_for,
                                      json_ready, nees, percentile, precision_recall, recall_at,
                                      step_accuracy, summarize)
from geozoom_ros.geo import destination


def test_recall_and_percentiles_by_hand():
    errors = [10.0, 30.0, 60.0, 120.0, None]  # None: no fix, a miss
    assert recall_at(errors, 25) == pytest.approx(0.2)
    assert recall_at(errors, 50) == pytest.approx(0.4)
    assert recall_at(errors, 100) == pytest.approx(0.6)
    assert percentile(errors, 50) == 60.0
    assert percentile(errors, 90) == math.inf
    assert percentile([0.0, 10.0, 20.0, 30.0], 50) == pytest.approx(15.0)
    assert percentile([0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0],
                      90) == pytest.approx(90.0)


def test_errors_are_geodesic_metres_with_east_north_components():
    lat0, lon0 = 48.0, 11.0
    lat1, lon1 = destination(lat0, lon0, 90.0, 300.0)   # 300 m east of the estimate
    lat2, lon2 = destination(lat0, lon0, 180.0, 40.0)   # 40 m south
    e = error_m([lat0, lat0, np.nan], [lon0, lon0, np.nan], [lat1, lat2, lat0], [lon1, lon2, lon0])
    assert e[0] == pytest.approx(300.0, abs=1e-6) and e[1] == pytest.approx(40.0, abs=1e-6)
    assert e[2] == math.inf
    en = error_en([lat0, lat0], [lon0, lon0], [lat1, lat2], [lon1, lon2])
    assert en[0] == pytest.approx([300.0, 0.0], abs=0.01)
    assert en[1] == pytest.approx([0.0, -40.0], abs=0.01)


def test_nees_by_hand():
    err = np.array([[3.0, 4.0], [1.0, 0.0], [np.nan, np.nan]])
    cov = np.array([np.diag([9.0, 16.0]), [[2.0, 1.0], [1.0, 2.0]], np.eye(2)])
    v = nees(err, cov)
    assert v[0] == pytest.approx(2.0)           # 9/9 + 16/16
    assert v[1] == pytest.approx(2.0 / 3.0)     # inverse [[2,-1],[-1,2]]/3 -> 2/3
    assert np.isnan(v[2])


def test_step_accuracy_and_chance():
    correct = np.array([[1, 1, 0], [1, 0, np.nan], [0, np.nan, np.nan], [1, 1, 1]], float)
    assert step_accuracy(correct) == pytest.approx([0.75, 2 / 3, 0.5])
    assert chance_step_accuracy(4, 3) == [1 / 16] * 3
    assert chance_recall(50.0, 1e6) == pytest.approx(math.pi * 2500 / 1e6)
    assert chance_recall(5000.0, 1e6) == 1.0


def test_gate_curve_by_hand():
    conf = [0.9, 0.8, 0.3, 0.1]
    ok = [True, False, True, False]
    curve = gate_curve(conf, ok, thresholds=[0.0, 0.5, 0.85, 0.95])
    assert curve[0] == {'threshold': 0.0, 'precision': 0.5, 'recall': 1.0, 'published': 1.0}
    assert curve[1]['precision'] == 0.5 and curve[1]['recall'] == 0.5
    assert curve[2]['precision'] == 1.0 and curve[2]['recall'] == 0.5
    assert math.isnan(curve[3]['precision']) and curve[3]['published'] == 0.0


def test_precision_recall_and_average_precision_by_hand():
    # Six fixes, three right; one tie at 0.6 and a missing confidence.
    conf = [0.9, 0.8, 0.6, 0.6, 0.2, np.nan]
    ok = [True, False, True, False, True, False]
    thr, p, r = precision_recall(conf, ok)
    np.testing.assert_allclose(thr, [0.9, 0.8, 0.6, 0.2])
    np.testing.assert_allclose(p, [1.0, 0.5, 0.5, 0.6])
    np.testing.assert_allclose(r, [1 / 3, 1 / 3, 2 / 3, 1.0])
    # AP = 1/3 * 1 + 0 * 0.5 + 1/3 * 0.5 + 1/3 * 0.6
    assert average_precision(conf, ok) == pytest.approx((1.0 + 0.5 + 0.6) / 3)
    # A perfect ranking scores 1; a reversed one far less; no right fix: undefined.
    assert average_precision([0.9, 0.8, 0.1, 0.05], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert average_precision([0.1, 0.05, 0.9, 0.8], [1, 1, 0, 0]) == pytest.approx(
        0.5 * (1 / 3) + 0.5 * 0.5)
    assert math.isnan(average_precision([0.5, 0.4], [False, False]))
    # A constant confidence carries no information: AP equals the share of right fixes.
    assert average_precision([0.3] * 5, [1, 0, 0, 1, 0]) == pytest.approx(0.4)


def test_gate_thresholds_follow_the_confidences():
    t = gate_thresholds_for(np.linspace(0.01, 0.11, 11))
    assert t[0] == 0.0 and 0.95 in t and t == sorted(set(t))
    assert 0.02 in t and 0.1 in t and 0.06 in t  # deciles where the confidences lie
    assert gate_thresholds_for([np.nan]) == [0.0] + [round(0.05 * i, 2) for i in range(1, 20)]


def test_summary_is_json_ready_with_required_keys():
    s = summarize([10.0, 80.0, None], nees_values=[1.0, 3.0, np.nan],
                  step_correct=[[1, 0], [1, 1], [0, np.nan]], latencies_ms=[10, 20, 30],
                  confidence=[0.9, 0.2, 0.0], k=4, steps=2, area_m2=4e6)
    for key in ('n', 'recall@25m', 'recall@50m', 'recall@100m', 'median_error_m', 'p90_error_m',
                'nees_mean', 'step_accuracy', 'latency_ms_p50', 'latency_ms_p95', 'chance'):
        assert key in s
    assert s['n'] == 3 and s['recall@100m'] == pytest.approx(2 / 3)
    assert s['median_error_m'] == 80.0 and s['p90_error_m'] is None  # inf -> null
    assert s['nees_mean'] == pytest.approx(2.0) and s['nees_mean_within_100m'] == pytest.approx(2)
    assert s['step_accuracy'] == pytest.approx([2 / 3, 0.5])
    assert s['latency_ms_p50'] == pytest.approx(20.0)
    assert s['chance']['recall@50m'] == pytest.approx(math.pi * 2500 / 4e6)
    assert json_ready({'a': np.float32(np.nan), 'b': [np.int64(3)]}) == {'a': None, 'b': [3]}
    # The gate: one fix of three within 50 m, and it is the most confident.
    assert s['gate_average_precision'] == 1.0 and s['gate_base_rate'] == pytest.approx(1 / 3)
    assert s['gate'][0] == {'threshold': 0.0, 'precision': pytest.approx(1 / 3), 'recall': 1.0,
                            'published': 1.0}
