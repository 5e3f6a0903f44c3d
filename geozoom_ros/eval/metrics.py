"""Localisation metrics: recall within a distance, error percentiles, NEES, step accuracy, gates.

Conventions: errors are geodesic metres on WGS84; a query without a fix counts as a miss with
an infinite error (so it lowers recall and raises the percentiles instead of vanishing).
Covariances are 2x2 east/north in m^2 at the estimate. numpy only.
"""

import math

import numpy as np

from geozoom_ros.geo import geodesic_bearing_deg, geodesic_distance_m

RECALL_DISTANCES_M = (25.0, 50.0, 100.0)


def _arr(values):
    return np.asarray([np.nan if v is None else v for v in np.ravel(values)], dtype=float)


def error_m(est_lat, est_lon, true_lat, true_lon):
    """Return geodesic errors in metres (arrays); NaN estimates give ``inf``."""
    est_lat, est_lon, true_lat, true_lon = (_arr(v) for v in (est_lat, est_lon, true_lat,
                                                              true_lon))
    out = np.full(est_lat.shape, np.inf)
    ok = np.isfinite(est_lat) & np.isfinite(est_lon)
    if ok.any():
        out[ok] = geodesic_distance_m(est_lat[ok], est_lon[ok], true_lat[ok], true_lon[ok])
    return out


def error_en(est_lat, est_lon, true_lat, true_lon):
    """Return ``[N, 2]`` east/north offsets (m) of the truth from the estimate (geodesic)."""
    est_lat, est_lon, true_lat, true_lon = (_arr(v) for v in (est_lat, est_lon, true_lat,
                                                              true_lon))
    out = np.full((len(est_lat), 2), np.nan)
    ok = np.isfinite(est_lat) & np.isfinite(est_lon)
    if ok.any():
        d = np.atleast_1d(geodesic_distance_m(est_lat[ok], est_lon[ok], true_lat[ok],
                                              true_lon[ok]))
        az = np.radians(np.atleast_1d(geodesic_bearing_deg(est_lat[ok], est_lon[ok],
                                                           true_lat[ok], true_lon[ok])))
        out[ok, 0] = d * np.sin(az)
        out[ok, 1] = d * np.cos(az)
    return out


def recall_at(errors_m, distance_m):
    """Return the fraction of queries whose error is within ``distance_m`` (0 for none)."""
    e = _arr(errors_m)
    if e.size == 0:
        return float('nan')
    return float(np.mean(np.nan_to_num(e, nan=np.inf, posinf=np.inf) <= distance_m))


def percentile(values, q):
    """Return a percentile q (0..100) of the values; ``inf`` if it falls on a miss.

    Linear interpolation when every value is finite; otherwise the order statistic (no
    interpolation across an infinite miss).
    """
    v = np.nan_to_num(_arr(values), nan=np.inf, posinf=np.inf)
    if v.size == 0:
        return float('nan')
    if np.all(np.isfinite(v)):
        return float(np.percentile(v, q))
    i = min(len(v) - 1, max(0, int(math.ceil(q / 100.0 * len(v))) - 1))
    return float(np.sort(v)[i])


def nees(err_en, cov_en):
    """Return the 2-D normalised estimation error squared ``e^T P^-1 e`` of each fix.

    ``err_en`` is ``[N, 2]`` (m), ``cov_en`` ``[N, 2, 2]`` (m^2). Rows with a missing fix
    (NaN) or a covariance whose determinant is not positive give NaN. A consistent filter
    averages 2 (the chi-square mean with 2 degrees of freedom).
    """
    e = np.asarray(err_en, dtype=float).reshape(-1, 2)
    p = np.asarray(cov_en, dtype=float).reshape(-1, 2, 2)
    out = np.full(len(e), np.nan)
    ok = np.all(np.isfinite(e), axis=1) & np.all(np.isfinite(p), axis=(1, 2))
    with np.errstate(invalid='ignore'):
        ok &= p[:, 0, 0] * p[:, 1, 1] - p[:, 0, 1] * p[:, 1, 0] > 0
    if ok.any():
        sol = np.linalg.solve(p[ok], e[ok][..., None])[..., 0]
        out[ok] = np.einsum('ni,ni->n', e[ok], sol)
    return out


def mean_finite(values):
    """Return the mean of the finite values, or NaN if there are none."""
    v = _arr(values)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float('nan')


def step_accuracy(correct):
    """Return per-step accuracy given the correct path so far.

    ``correct`` is ``[N, steps]``: 1/True where the model's best action at step t (fed the true
    path before t) was the true action, 0/False where not, NaN where the step was not scored.
    """
    c = np.asarray(correct, dtype=float)
    if c.ndim != 2 or c.shape[0] == 0:
        return []
    out = []
    for t in range(c.shape[1]):
        col = c[:, t]
        col = col[np.isfinite(col)]
        out.append(float(col.mean()) if col.size else float('nan'))
    return out


def chance_step_accuracy(k, steps):
    """Return the per-step accuracy of uniform random actions: ``1 / k^2`` at every step."""
    return [1.0 / (k * k)] * int(steps)


def chance_recall(distance_m, area_m2):
    """Return the probability that a uniformly random guess over ``area_m2`` is within d.

    ``min(1, pi d^2 / area)``: the disc around the truth over the map's area (edge effects
    ignored).
    """
    if not area_m2 or area_m2 <= 0:
        return float('nan')
    return float(min(1.0, math.pi * distance_m * distance_m / area_m2))


def gate_curve(confidence, correct, thresholds=None):
    """Return the precision/recall of publishing only fixes with confidence >= threshold.

    ``correct`` marks the fixes that are right (e.g. error <= 50 m). Precision = right among
    published; recall = published among the right ones; ``published`` = fraction of all
    queries published. Returns a list of dicts, one per threshold (default: 0, 0.05 .. 0.95).
    """
    conf = np.nan_to_num(_arr(confidence), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    ok = np.asarray(correct, dtype=bool).ravel()
    if thresholds is None:
        thresholds = [0.0] + [round(0.05 * i, 2) for i in range(1, 20)]
    n_ok = int(ok.sum())
    curve = []
    for t in thresholds:
        pub = conf >= t
        n_pub = int(pub.sum())
        tp = int((pub & ok).sum())
        curve.append({'threshold': float(t),
                      'precision': tp / n_pub if n_pub else float('nan'),
                      'recall': tp / n_ok if n_ok else float('nan'),
                      'published': n_pub / len(conf) if len(conf) else float('nan')})
    return curve


def gate_thresholds_for(confidence):
    """Return gate thresholds: 0, 0.05 .. 0.95 and the deciles of the finite confidences.

    The deciles (rounded to 4 decimals) resolve the curve where a model's confidences
    actually lie, which is often far below 0.5.
    """
    grid = [0.0] + [round(0.05 * i, 2) for i in range(1, 20)]
    conf = _arr(confidence)
    conf = conf[np.isfinite(conf)]
    if conf.size:
        grid += [round(float(q), 4) for q in np.quantile(conf, np.linspace(0.1, 0.9, 9))]
    return sorted(set(grid))


def precision_recall(confidence, correct):
    """Return the gate's precision/recall at every distinct confidence, most confident first.

    A gate publishes the fixes whose confidence is >= a threshold. For each distinct
    confidence value ``t`` (descending) this returns ``(thresholds, precision, recall)``
    arrays: precision = right fixes among those published, recall = published right fixes
    among all right ones. Missing confidences (NaN) are never published. Empty arrays when no
    query has a finite confidence.
    """
    conf = _arr(confidence)
    ok = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError(f'{conf.size} confidences for {ok.size} correct flags')
    fin = np.isfinite(conf)
    conf, right = conf[fin], ok[fin]
    n_ok = int(ok.sum())
    if conf.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-conf, kind='stable')
    conf, right = conf[order], right[order]
    tp = np.cumsum(right)
    # The last index of each run of equal confidences: a threshold publishes the whole run.
    last = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    published = last + 1
    precision = tp[last] / published
    recall = tp[last] / n_ok if n_ok else np.full(len(last), np.nan)
    return conf[last], precision.astype(float), np.asarray(recall, dtype=float)


def average_precision(confidence, correct):
    """Return the gate's average precision: ``sum_k (R_k - R_{k-1}) P_k`` over thresholds.

    The area under the step precision/recall curve of :func:`precision_recall` (recall from 0),
    as in information retrieval. A confidence that carries no information scores the share of
    right fixes; a perfect ranking scores 1. NaN when no fix is right.
    """
    _, p, r = precision_recall(confidence, correct)
    if r.size == 0 or not np.all(np.isfinite(r)):
        return float('nan')
    return float(np.sum(np.diff(np.r_[0.0, r]) * p))


def summarize(errors_m, nees_values=None, step_correct=None, latencies_ms=None,
              confidence=None, k=4, steps=4, area_m2=None, gate_distance_m=50.0,
              gate_thresholds=None):
    """Return the evaluation summary dict (JSON-ready: non-finite values become None).

    With ``confidence``, the gate figures: ``gate`` (precision/recall/published share at
    ``gate_thresholds``, default :func:`gate_curve`'s), ``gate_average_precision`` and
    ``gate_base_rate`` (the share of fixes within ``gate_distance_m``: what a gate that
    knows nothing reaches).
    """
    e = np.nan_to_num(_arr(errors_m), nan=np.inf, posinf=np.inf)
    out = {'n': int(e.size)}
    for d in RECALL_DISTANCES_M:
        out[f'recall@{d:g}m'] = recall_at(e, d)
    out['median_error_m'] = percentile(e, 50)
    out['p90_error_m'] = percentile(e, 90)
    out['fixes'] = int(np.isfinite(e).sum())
    if nees_values is not None:
        nv = _arr(nees_values)
        out['nees_mean'] = mean_finite(nv)
        near = np.isfinite(nv) & (e <= 100.0)
        out['nees_mean_within_100m'] = float(nv[near].mean()) if near.any() else float('nan')
        out['nees_fraction_within_chi2_95'] = float(np.mean(nv[np.isfinite(nv)] <= 5.991)) \
            if np.isfinite(nv).any() else float('nan')
    else:
        out['nees_mean'] = None
    out['step_accuracy'] = step_accuracy(step_correct) if step_correct is not None else None
    if latencies_ms is not None and len(latencies_ms):
        lat = _arr(latencies_ms)
        out['latency_ms_p50'] = float(np.percentile(lat, 50))
        out['latency_ms_p95'] = float(np.percentile(lat, 95))
    else:
        out['latency_ms_p50'] = out['latency_ms_p95'] = None
    out['chance'] = {'step_accuracy': chance_step_accuracy(k, steps)}
    for d in RECALL_DISTANCES_M:
        out['chance'][f'recall@{d:g}m'] = chance_recall(d, area_m2)
    if confidence is not None:
        right = e <= gate_distance_m
        out['gate'] = gate_curve(confidence, right, thresholds=gate_thresholds)
        out['gate_distance_m'] = gate_distance_m
        out['gate_average_precision'] = average_precision(confidence, right)
        out['gate_base_rate'] = float(np.mean(right)) if right.size else float('nan')
    return json_ready(out)


def json_ready(obj):
    """Return ``obj`` with NaN/inf floats replaced by None and numpy scalars made plain."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    return obj
