"""Covariance calibration: the fit recovers known parameters, apply keeps covariances SPD."""

import json
import math

import numpy as np
import pytest

from geozoom_ros import calibration as C
from geozoom_ros.errors import InputError, MismatchError
from geozoom_ros.eval.metrics import nees

HASH = 'ab' * 32


def _search_covs(rng, n):
    """Random SPD search covariances (m^2): per-axis spreads from 5 to 300 m, any orientation."""
    sig = np.exp(rng.uniform(np.log(5.0), np.log(300.0), (n, 2)))
    th = rng.uniform(0, np.pi, n)
    r = np.stack([np.stack([np.cos(th), -np.sin(th)], 1), np.stack([np.sin(th), np.cos(th)], 1)],
                 1)
    return np.einsum('nij,nj,nkj->nik', r, sig ** 2, r)


def _draw(rng, covs):
    return np.einsum('nij,nj->ni', np.linalg.cholesky(covs), rng.standard_normal((len(covs), 2)))


def test_fit_recovers_known_parameters_of_gaussian_errors():
    rng = np.random.default_rng(0)
    n = 3000
    s = _search_covs(rng, n)
    conf = rng.uniform(0.0, 1.0, n)
    truth = C.CovarianceModel(a=0.3, b0_m=8.0, b1_m=40.0)
    err = _draw(rng, truth.apply(s, conf))
    m = C.fit(err, s, conf, outliers=False)
    assert m.a == pytest.approx(0.3, rel=0.1)
    assert m.b0_m == pytest.approx(8.0, rel=0.2)
    assert m.b1_m == pytest.approx(40.0, rel=0.1)
    assert m.outlier_share == 0.0 and m.outlier_sigma_m is None
    # Maximum likelihood of the right family gives a mean NEES of 2 on its own data.
    assert C.nees_summary(err, m.apply(s, conf))['nees_mean'] == pytest.approx(2.0, rel=0.05)


def test_fit_with_far_misses_recovers_the_near_gaussian_and_the_miss_share():
    rng = np.random.default_rng(1)
    n = 3000
    s = _search_covs(rng, n) * 0.1
    conf = rng.uniform(0.0, 1.0, n)
    truth = C.CovarianceModel(a=2.0, b0_m=10.0, b1_m=25.0)
    err = _draw(rng, truth.apply(s, conf))
    far = rng.random(n) < 0.4
    err[far] = rng.normal(0.0, 500.0, (far.sum(), 2))
    m = C.fit(err, s, conf)
    assert m.a == pytest.approx(2.0, rel=0.15)
    assert m.b0_m == pytest.approx(10.0, rel=0.25)
    assert m.b1_m == pytest.approx(25.0, rel=0.15)
    assert m.outlier_share == pytest.approx(0.4, abs=0.04)
    assert m.outlier_sigma_m == pytest.approx(500.0, rel=0.1)
    # The near fixes get a consistent covariance; one Gaussian for everything would not.
    near = ~far
    assert C.nees_summary(err[near], m.apply(s, conf)[near])['nees_mean'] == \
        pytest.approx(2.0, rel=0.1)
    single = C.fit(err, s, conf, outliers=False)
    assert C.nees_summary(err[near], single.apply(s, conf)[near])['nees_mean'] < 0.2


def test_fit_with_a_constant_search_covariance_is_decided_and_consistent():
    # Greedy search publishes side^2/12 for every fix: a and b0 trade off exactly, the weak
    # prior on a picks one, and the published covariance is what the data say.
    rng = np.random.default_rng(2)
    n = 1500
    s = np.broadcast_to(np.eye(2) * 56.0, (n, 2, 2)).copy()
    conf = rng.uniform(0, 1, n)
    err = rng.normal(0, 1, (n, 2)) * np.sqrt(400.0 + 900.0 * (1 - conf))[:, None]
    m = C.fit(err, s, conf, outliers=False)
    var = m.apply(s, conf)[:, 0, 0]
    np.testing.assert_allclose(var, 400.0 + 900.0 * (1 - conf), rtol=0.15)
    assert 0.05 < m.a < 20


def test_fit_leaves_out_missing_fixes_and_needs_enough_rows():
    rng = np.random.default_rng(3)
    s = _search_covs(rng, 50)
    err = rng.normal(0, 20, (50, 2))
    err[:5] = np.nan
    m = C.fit(err, s, np.full(50, 0.5), outliers=False)
    assert np.isfinite(m.a) and m.b0_m > 0
    with pytest.raises(InputError, match='at least 10 fixes'):
        C.fit(err[:12], s[:12], np.full(12, 0.5))
    with pytest.raises(InputError, match='one of each'):
        C.fit(err, s[:3], np.full(50, 0.5))


def test_apply_values_and_symmetric_positive_definite():
    m = C.CovarianceModel(a=0.5, b0_m=3.0, b1_m=4.0)
    s = np.array([[100.0, 20.0], [20.0, 50.0]])
    np.testing.assert_allclose(m.apply(s, 0.0), 0.5 * s + 25.0 * np.eye(2))
    np.testing.assert_allclose(m.apply(s, 1.0), 0.5 * s + 9.0 * np.eye(2))
    np.testing.assert_allclose(m.apply(s, 0.75), 0.5 * s + 13.0 * np.eye(2))
    # Out-of-range and missing confidences are clipped / count as 0.
    np.testing.assert_allclose(m.apply(s, 7.0), m.apply(s, 1.0))
    np.testing.assert_allclose(m.apply(s, np.nan), m.apply(s, 0.0))
    rng = np.random.default_rng(4)
    covs = _search_covs(rng, 200)
    covs[0] = 0.0                                  # a degenerate search covariance
    covs[1] = [[1e4, 1e4], [1e4, 1e4]]             # rank one
    covs[2] = [[9.0, 2.0], [1.0, 4.0]]             # slightly asymmetric input
    conf = rng.uniform(-0.5, 1.5, 200)
    wide = C.CovarianceModel(a=3.0, b0_m=C.MIN_SIGMA_M, b1_m=2.0)
    out = wide.apply(covs, conf)
    assert out.shape == (200, 2, 2)
    # One fix with a scalar confidence (the localizer's path) gives the batch's values.
    for i in (0, 1, 2, 3):
        np.testing.assert_allclose(wide.apply(covs[i], float(conf[i])), out[i], rtol=1e-12)
    np.testing.assert_array_equal(out, np.swapaxes(out, 1, 2))
    assert np.all(np.linalg.eigvalsh(out) > 0)


def test_json_round_trip_is_atomic_and_keeps_every_method(tmp_path):
    cal = C.Calibration({'zoom': C.CovarianceModel(0.4, 2.0, 30.0, 0.7, 410.0),
                         'zoom-beam': C.CovarianceModel(1.1, 0.5, 0.0)}, HASH,
                        {'zoom': {'split': 'val', 'n': 400}})
    path = C.save(cal, tmp_path / C.CALIBRATION_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.CALIBRATION_FILE]
    back = C.load(path)
    assert back.models == cal.models and back.model_sha256 == HASH
    assert back.info['zoom'] == {'split': 'val', 'n': 400} and back.path == path
    d = json.loads(path.read_text())
    assert d['format'] == C.FORMAT and d['methods']['zoom-beam']['outlier_sigma_m'] is None
    s = np.eye(2) * 10.0
    np.testing.assert_allclose(back.apply(s, 0.5, 'zoom'), 0.4 * s + (4.0 + 450.0) * np.eye(2))
    np.testing.assert_allclose(back.apply(s, 0.5, 'retrieval'), s)  # no entry: unchanged


@pytest.mark.parametrize('text, message', [
    ('{not json', 'not readable JSON'),
    ('[]', 'not a geozoom-calibration file'),
    ('{"format": "geozoom-calibration", "format_version": 9, "methods": {}}',
     'format_version 9'),
    ('{"format": "geozoom-calibration", "format_version": 1, "methods": {}}', 'no "methods"'),
    ('{"format": "geozoom-calibration", "format_version": 1, "methods": {"zoom": '
     '{"a": 1, "b0_m": 2}}}', "method 'zoom': calibration parameters lack b1_m"),
    ('{"format": "geozoom-calibration", "format_version": 1, "methods": {"zoom": '
     '{"a": -1, "b0_m": 2, "b1_m": 0}}}', 'out of range'),
    ('{"format": "geozoom-calibration", "format_version": 1, "methods": {"zoom": '
     '{"a": "big", "b0_m": 2, "b1_m": 0}}}', 'must be a finite number'),
])
def test_bad_files_are_one_line_input_errors(tmp_path, text, message):
    path = tmp_path / 'calibration.json'
    path.write_text(text)
    with pytest.raises(InputError) as info:
        C.load(path)
    msg = str(info.value)
    assert message in msg and str(path) in msg and '\n' not in msg
    with pytest.raises(InputError, match='does not exist'):
        C.load(tmp_path / 'missing.json')


def test_resolve_auto_path_off_and_model_mismatch(tmp_path):
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    assert C.resolve('auto', model_dir) is None  # no file: no calibration
    cal = C.Calibration({'zoom': C.CovarianceModel(2.0, 1.0, 0.0)}, HASH)
    C.save(cal, C.calibration_path(model_dir))
    assert C.calibration_path(model_dir / 'model.safetensors') == model_dir / C.CALIBRATION_FILE
    assert C.resolve('auto', model_dir, HASH).models == cal.models
    assert C.resolve(None, model_dir) is None and C.resolve(False, model_dir) is None
    assert C.resolve('none', model_dir) is None
    other = C.save(C.Calibration({'zoom': C.CovarianceModel(3.0, 1.0, 0.0)}),
                   tmp_path / 'other.json')
    assert C.resolve(str(other), model_dir, HASH).models['zoom'].a == 3.0  # no hash: no check
    with pytest.raises(MismatchError, match='fitted for model abababab, not cdcdcdcd'):
        C.resolve('auto', model_dir, 'cd' * 32)


def test_nees_by_hand():
    e = np.array([[3.0, 4.0], [np.nan, 1.0], [300.0, 0.0]])
    p = np.array([np.eye(2) * 25.0, np.eye(2), [[9e4, 0.0], [0.0, 1.0]]])
    np.testing.assert_allclose(nees(e, p), [1.0, np.nan, 1.0])
    # A covariance without a positive determinant gives no NEES (not an error).
    assert np.isnan(nees(e[:1], np.zeros((1, 2, 2))))[0]
    s = C.nees_summary(e, p)
    assert s == {'nees_mean': 1.0, 'nees_mean_within_100m': 1.0, 'n': 2,
                 'n_within_100m': 1}
    assert math.isclose(C.nees_summary(e, p * 2)['nees_mean'], 0.5)


def _brute_gate(err, conf, precision, within, min_fixes):
    best = None
    for t in sorted(set(conf[np.isfinite(err)])):
        keep = np.isfinite(err) & (conf >= t)
        if keep.sum() >= min_fixes and np.mean(err[keep] <= within) >= precision:
            best = t if best is None else min(best, t)
    return best


def test_fit_gate_is_the_lowest_threshold_reaching_the_precision():
    rng = np.random.default_rng(3)
    conf = np.round(rng.uniform(0, 1, 400), 2)  # ties: equal confidences pass together
    err = np.where(rng.uniform(0, 1, 400) < conf, rng.uniform(0, 40, 400),
                   rng.uniform(60, 900, 400))
    err[::50] = np.nan  # queries without a fix count in the published share only
    for precision, min_fixes in ((0.8, 20), (0.9, 20), (0.7, 5), (0.95, 50)):
        g = C.fit_gate(err, conf, precision, 50.0, min_fixes)
        want = _brute_gate(err, conf, precision, 50.0, min_fixes)
        assert g['min_confidence'] == want
        if want is not None:
            keep = np.isfinite(err) & (conf >= want)
            assert g['published'] == keep.sum() and g['published_share'] == keep.sum() / 400
            assert g['precision'] == pytest.approx(np.mean(err[keep] <= 50.0))
            assert g['precision'] >= precision
    # Lower precision targets keep more fixes.
    assert C.fit_gate(err, conf, 0.7)['published'] > C.fit_gate(err, conf, 0.9)['published']
    # Unreachable: no threshold, and the best precision seen.
    g = C.fit_gate(np.full(30, 100.0), np.linspace(0, 1, 30))
    assert g['min_confidence'] is None and g['best_precision'] == 0.0
    assert C.fit_gate([10.0] * 5, [0.9] * 5)['best_precision'] is None  # too few fixes
    with pytest.raises(InputError, match='precision 1.5'):
        C.fit_gate(err, conf, 1.5)
    with pytest.raises(InputError, match='400 errors and 3'):
        C.fit_gate(err, conf[:3])


def test_gates_round_trip_and_the_node_gate_takes_each_searchs_threshold(tmp_path):
    from geozoom_ros.ros.gating import Gate

    cal = C.Calibration({'zoom-beam': C.CovarianceModel(1.0, 5.0, 0.0),
                         'zoom-fused': C.CovarianceModel(1.0, 5.0, 0.0),
                         'zoom': C.CovarianceModel(1.0, 5.0, 0.0)}, HASH, {},
                        gates={'zoom-beam': {'min_confidence': 0.7},
                               'zoom-fused': {'min_confidence': 0.35},
                               'zoom': {'min_confidence': None, 'best_precision': 0.5}})
    back = C.load(C.save(cal, tmp_path / C.CALIBRATION_FILE))
    assert back.gates == cal.gates
    assert back.gate_thresholds() == {'zoom-beam': 0.7, 'zoom-fused': 0.35}
    gate = Gate(min_confidence=0.6, max_sigma_m=100.0).use_calibration(back)
    cov = np.eye(2) * 400.0  # 20 m
    assert gate.passes(0.4, cov, 'zoom-fused')[0] and not gate.passes(0.4, cov, 'zoom-beam')[0]
    assert gate.passes(0.65, cov, 'zoom')[0]  # no fitted threshold: min_confidence
    assert not gate.passes(0.9, cov * 100, 'zoom-fused')[0]  # 200 m > max_sigma_m
    assert gate.to_json()['calibrated_min_confidence'] == {'zoom-beam': 0.7, 'zoom-fused': 0.35}
    fixed = Gate(min_confidence=0.6, gate_source='parameters').use_calibration(back)
    assert fixed.threshold('zoom-fused') == 0.6 and not fixed.passes(0.4, cov, 'zoom-fused')[0]
    assert Gate().use_calibration(None).threshold('zoom-beam') == Gate().min_confidence
    text = (tmp_path / C.CALIBRATION_FILE).read_text().replace('0.35', '1.5')
    (tmp_path / 'bad.json').write_text(text)
    with pytest.raises(InputError, match="'zoom-fused': gate min_confidence 1.5"):
        C.load(tmp_path / 'bad.json')


def test_rescale_makes_the_fixes_within_the_distance_consistent():
    rng = np.random.default_rng(8)
    n = 3000
    covs = _search_covs(rng, n) * 0.05
    conf = rng.uniform(0, 1, n)
    truth = C.CovarianceModel(1.0, 15.0, 10.0)
    err = _draw(rng, truth.apply(covs, conf))
    far = rng.uniform(0, 1, n) < 0.3
    err[far] = rng.normal(0, 400.0, (far.sum(), 2))
    model = C.fit(err, covs, conf)
    near = np.hypot(err[:, 0], err[:, 1]) <= 100.0
    before = np.mean(nees(err[near], model.apply(covs[near], conf[near])))
    scaled, k = C.rescale_to_nees(model, err, covs, conf, within_m=100.0)
    assert k == pytest.approx(before / 2.0)
    after = nees(err[near], scaled.apply(covs[near], conf[near]))
    assert np.mean(after) == pytest.approx(2.0, rel=1e-9)
    # One scale on the whole covariance.
    np.testing.assert_allclose(scaled.apply(covs[:50], conf[:50]),
                               k * model.apply(covs[:50], conf[:50]), rtol=1e-9)
    assert scaled.outlier_share == model.outlier_share
    # Too few fixes within the distance: unchanged.
    assert C.rescale_to_nees(model, err, covs, conf, within_m=0.5) == (model, 1.0)
