"""Covariance calibration: turn the search's covariance into one a filter can trust.

The zoom search's covariance (``geozoom_ros.search.hypotheses_covariance``: the weighted spread
of the terminal hypotheses plus one cell's quantisation, ``side^2 / 12`` per axis) says how the
hypotheses disagree, not how far the fix is from the truth. A :class:`CovarianceModel` maps it,
with the search's confidence, to the published covariance (east/north, m^2, local ENU at the
fix)::

    cov = a * search_cov + (b0_m^2 + b1_m^2 * (1 - confidence)) * I

``a`` scales the hypotheses' spread, ``b0_m`` (metres) is an error floor every fix has (the
cell size, the camera seeing past its own cell), ``b1_m`` (metres) grows the error as the
search's confidence falls. With ``a > 0`` and ``b0_m > 0`` the result is symmetric positive
definite for any positive semi-definite ``search_cov``.

Fitting (:func:`fit`) is maximum likelihood of the 2-D east/north errors of a validation split.
The policy's errors are bimodal: a fix lands near the truth (tens of metres) or in another
part of the map (hundreds of metres). By default the errors are modelled as a mixture: with
probability ``1 - outlier_share`` the Gaussian above, otherwise a broad zero-mean Gaussian of
``outlier_sigma_m`` per axis. The published covariance is the first component, so it describes
the fixes a filter should fuse (NEES near 2 on fixes near the truth) and leaves the far misses
to the filter's Mahalanobis gate and the node's confidence gate. ``outliers=False`` fits one
Gaussian to every error instead: consistent on average over all fixes, but so wide that it
makes the good fixes worthless.

The near Gaussian describes the fixes it counts as near; fixes between its spread and 100 m,
which a filter's Mahalanobis gate may still accept, then have NEES well above 2.
:func:`rescale_to_nees` scales the whole published covariance once so that the fixes within
100 m of the fitting split have mean NEES 2 (``geozoom calibrate --nees-within-m``).

The same fit chooses each method's confidence gate (:func:`fit_gate`): the lowest confidence
whose fixes on the validation split lie within ``within_m`` (50 m) at the target precision
(0.8). A search's confidences are not comparable across methods (the fused search's are
sharper than the zoom beam's), so one fixed ``min_confidence`` publishes very different shares
of fixes; the node takes the threshold of the method that ran (``gate_source: calibration``).

The fitted parameters live beside the model as ``<model_dir>/calibration.json`` (one entry
per search method with its optional ``gate``, the model's sha256, and how they were fitted);
the model's hash covers only ``model.safetensors``, so adding the file does not change the
model. numpy only (NEES and the gate's precision curve come from ``geozoom_ros.eval.metrics``).
"""

from dataclasses import dataclass, field
import json
import math
from pathlib import Path

import numpy as np

from geozoom_ros.errors import InputError, MismatchError
from geozoom_ros.eval.metrics import nees, precision_recall
from geozoom_ros.fileio import atomic_write_json

CALIBRATION_FILE = 'calibration.json'
FORMAT = 'geozoom-calibration'
FORMAT_VERSION = 1
DEFAULT_GATE_PRECISION = 0.8
DEFAULT_GATE_WITHIN_M = 50.0
MIN_GATE_FIXES = 20  # a threshold must publish at least this many validation fixes
MIN_SIGMA_M = 0.1  # floor of b0_m: keeps every published covariance positive definite
_LOG_2PI = math.log(2.0 * math.pi)
# A weak prior on log(a) (standard deviation 3, a factor of 20): it only decides where the
# likelihood is flat, e.g. greedy search, whose covariance is the same for every fix so that
# a and b0_m trade off exactly.
_LOG_A_PRIOR_SD = 3.0


@dataclass(frozen=True)
class CovarianceModel:
    """``cov = a * search_cov + (b0_m^2 + b1_m^2 * (1 - confidence)) * I`` (m^2, east/north).

    Attributes:
        a: scale of the search's covariance (dimensionless, > 0).
        b0_m: error floor, metres per axis (>= MIN_SIGMA_M).
        b1_m: extra error at zero confidence, metres per axis (>= 0).
        outlier_share: fitted share of fixes the Gaussian does not describe (0 when fitted
            without outliers); descriptive, not used by :meth:`apply`.
        outlier_sigma_m: per-axis spread of those far misses in metres (None without).
    """

    a: float = 1.0
    b0_m: float = MIN_SIGMA_M
    b1_m: float = 0.0
    outlier_share: float = 0.0
    outlier_sigma_m: float = None

    def __post_init__(self):
        for name in ('a', 'b0_m', 'b1_m', 'outlier_share'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f'calibration {name}={v!r} must be a finite number')
        if self.a <= 0 or self.b0_m < MIN_SIGMA_M or self.b1_m < 0 \
                or not 0 <= self.outlier_share < 1:
            raise InputError(f'calibration a={self.a}, b0_m={self.b0_m}, b1_m={self.b1_m}, '
                             f'outlier_share={self.outlier_share} are out of range (a > 0, '
                             f'b0_m >= {MIN_SIGMA_M}, b1_m >= 0, 0 <= outlier_share < 1); '
                             'run geozoom calibrate again')
        s = self.outlier_sigma_m
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))
                              or not math.isfinite(s) or s <= 0):
            raise InputError(f'calibration outlier_sigma_m={s!r} must be a positive number '
                             'or null')

    def apply(self, cov_en, confidence):
        """Return the calibrated covariance (m^2) of ``cov_en`` ``[2, 2]`` or ``[N, 2, 2]``.

        ``confidence`` is a scalar or ``[N]`` in 0..1 (clipped; NaN counts as 0). The result
        is symmetric positive definite for positive semi-definite input.
        """
        cov = np.asarray(cov_en, dtype=float)
        single = cov.ndim == 2
        if single and np.ndim(confidence) == 0:
            # One fix (the localizer's, per frame): plain floats, no batch machinery.
            c = float(confidence)
            c = 0.0 if math.isnan(c) else min(max(c, 0.0), 1.0)
            iso = self.b0_m ** 2 + self.b1_m ** 2 * (1.0 - c)
            (xx, xy), (yx, yy) = cov.tolist()
            off = self.a * 0.5 * (xy + yx)
            return np.array([[self.a * xx + iso, off], [off, self.a * yy + iso]])
        cov = cov.reshape(-1, 2, 2)
        c = np.nan_to_num(np.asarray(confidence, dtype=float).reshape(-1), nan=0.0)
        c = np.clip(np.broadcast_to(c, (len(cov),)), 0.0, 1.0)
        iso = self.b0_m ** 2 + self.b1_m ** 2 * (1.0 - c)
        out = self.a * 0.5 * (cov + np.swapaxes(cov, 1, 2)) + iso[:, None, None] * np.eye(2)
        return out[0] if single else out

    def to_dict(self):
        """Return the JSON-ready parameters."""
        return {'a': self.a, 'b0_m': self.b0_m, 'b1_m': self.b1_m,
                'outlier_share': self.outlier_share, 'outlier_sigma_m': self.outlier_sigma_m}

    @classmethod
    def from_dict(cls, d):
        """Return the model of a parameter dict (InputError naming a bad or missing field)."""
        if not isinstance(d, dict):
            raise InputError(f'calibration parameters must be an object, got {d!r}')
        missing = [k for k in ('a', 'b0_m', 'b1_m') if k not in d]
        if missing:
            raise InputError(f'calibration parameters lack {", ".join(missing)}')
        return cls(a=d['a'], b0_m=d['b0_m'], b1_m=d['b1_m'],
                   outlier_share=d.get('outlier_share', 0.0),
                   outlier_sigma_m=d.get('outlier_sigma_m'))


@dataclass
class Calibration:
    """The contents of ``calibration.json``: one :class:`CovarianceModel` per search method.

    Attributes:
        models: ``{method: CovarianceModel}`` ('zoom', 'zoom-beam', 'zoom-fused').
        model_sha256: hash of the model's ``model.safetensors`` the fit used (or None).
        info: ``{method: dict}`` how each was fitted (data, split, n, NEES before/after).
        path: the file it was read from (None when built in memory).
        gates: ``{method: dict}`` the confidence gate :func:`fit_gate` chose for each method
            (``min_confidence`` None when no threshold reached the target precision).
    """

    models: dict = field(default_factory=dict)
    model_sha256: str = None
    info: dict = field(default_factory=dict)
    path: Path = None
    gates: dict = field(default_factory=dict)

    def model_for(self, method):
        """Return the CovarianceModel of ``method``, or None when it was not calibrated."""
        return self.models.get(method)

    def gate_thresholds(self):
        """Return ``{method: min_confidence}`` of the methods with a fitted gate threshold."""
        return {k: g['min_confidence'] for k, g in self.gates.items()
                if g.get('min_confidence') is not None}

    def apply(self, cov_en, confidence, method='zoom-beam'):
        """Return ``cov_en`` calibrated for ``method`` (unchanged when it has no entry)."""
        m = self.model_for(method)
        return np.asarray(cov_en, dtype=float) if m is None else m.apply(cov_en, confidence)

    def check_model(self, model_sha256):
        """Raise MismatchError when the file was fitted for a model other than this hash."""
        if self.model_sha256 and model_sha256 and self.model_sha256 != model_sha256:
            where = self.path or CALIBRATION_FILE
            raise MismatchError(
                f'calibration {where} was fitted for model {self.model_sha256[:8]}, not '
                f'{model_sha256[:8]}; run geozoom calibrate for this model or remove the file')

    def to_dict(self):
        """Return the JSON-ready file contents."""
        return {'format': FORMAT, 'format_version': FORMAT_VERSION,
                'model_sha256': self.model_sha256,
                'methods': {k: {**m.to_dict(), 'fitted': self.info.get(k, {}),
                                **({'gate': self.gates[k]} if k in self.gates else {})}
                            for k, m in sorted(self.models.items())}}


# --------------------------------------------------------------------------------------------
# Files

def calibration_path(model_path):
    """Return ``<model_dir>/calibration.json`` for a model folder (or a file inside it)."""
    p = Path(model_path)
    return (p if p.is_dir() or not p.suffix else p.parent) / CALIBRATION_FILE


def load(path):
    """Read a calibration.json; raise InputError (one line) when it is unreadable or invalid."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f'calibration {path} does not exist; run geozoom calibrate or pass '
                         'another file')
    try:
        d = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f'calibration {path} is not readable JSON ({exc}); run geozoom '
                         'calibrate again') from None
    if not isinstance(d, dict) or d.get('format') != FORMAT:
        raise InputError(f'calibration {path} is not a {FORMAT} file (no "format": "{FORMAT}"); '
                         'run geozoom calibrate again')
    if d.get('format_version') != FORMAT_VERSION:
        raise InputError(f'calibration {path} has format_version {d.get("format_version")!r}, '
                         f'this package reads {FORMAT_VERSION}; run geozoom calibrate again')
    methods = d.get('methods')
    if not isinstance(methods, dict) or not methods:
        raise InputError(f'calibration {path} has no "methods" entries; run geozoom calibrate '
                         'again')
    models, info, gates = {}, {}, {}
    for name, entry in methods.items():
        try:
            models[name] = CovarianceModel.from_dict(entry)
            if entry.get('gate') is not None:
                gates[name] = _check_gate(entry['gate'])
        except InputError as exc:
            raise InputError(f'calibration {path} method {name!r}: {exc}') from None
        info[name] = entry.get('fitted', {}) if isinstance(entry.get('fitted'), dict) else {}
    sha = d.get('model_sha256')
    if sha is not None and not isinstance(sha, str):
        raise InputError(f'calibration {path} model_sha256 {sha!r} must be a string or null')
    return Calibration(models, sha, info, path, gates)


def _check_gate(gate):
    """Return a ``gate`` entry whose ``min_confidence`` is None or in 0..1 (else InputError)."""
    t = gate.get('min_confidence') if isinstance(gate, dict) else gate
    if not isinstance(gate, dict) or (t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0)):
        raise InputError(f'gate min_confidence {t!r} must be a number in 0..1 or null')
    return gate


def save(calibration, path):
    """Write ``calibration`` to ``path`` atomically (temporary name, then rename); return it."""
    return atomic_write_json(Path(path), _json_ready(calibration.to_dict()))


def resolve(calibration, model_path, model_sha256=None):
    """Return the Calibration to use, or None.

    ``calibration``: 'auto' (``<model_dir>/calibration.json`` when present), None, False or
    'none' (none), a path, or a :class:`Calibration`. A file fitted for another model (by
    hash) raises MismatchError.
    """
    if calibration is None or calibration is False or calibration == 'none':
        return None
    if isinstance(calibration, Calibration):
        cal = calibration
    elif isinstance(calibration, str) and calibration == 'auto':
        p = calibration_path(model_path)
        if not p.is_file():
            return None
        cal = load(p)
    elif isinstance(calibration, (str, Path)):
        cal = load(calibration)
    else:
        raise InputError(f'calibration {calibration!r} must be "auto", "none" or a path to a '
                         f'{CALIBRATION_FILE}')
    cal.check_model(model_sha256)
    return cal


def _json_ready(obj):
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Fitting

def _gauss_loglik(e, s00, s01, s11):
    det = s00 * s11 - s01 * s01
    q = (s11 * e[:, 0] ** 2 - 2.0 * s01 * e[:, 0] * e[:, 1] + s00 * e[:, 1] ** 2) / det
    return -_LOG_2PI - 0.5 * np.log(det) - 0.5 * q


def _outlier_var(theta, s_mean, c_mean):
    # Tied above the mean per-axis variance of the Gaussian: the broad component cannot
    # swap roles with it (a mixture's likelihood is otherwise symmetric in its components).
    ref = (MIN_SIGMA_M ** 2 + math.exp(theta[1]) + math.exp(theta[2]) * (1.0 - c_mean)
           + math.exp(theta[0]) * s_mean)
    return ref * (1.0 + math.exp(theta[4]))


def _negloglik(theta, e, s, c, outliers):
    a = math.exp(theta[0])
    iso = MIN_SIGMA_M ** 2 + math.exp(theta[1]) + math.exp(theta[2]) * (1.0 - c)
    ll = _gauss_loglik(e, a * s[:, 0, 0] + iso, a * s[:, 0, 1], a * s[:, 1, 1] + iso)
    if outliers:
        share = 1.0 / (1.0 + math.exp(-theta[3]))
        var_out = _outlier_var(theta, 0.5 * float(np.mean(s[:, 0, 0] + s[:, 1, 1])),
                               float(np.mean(c)))
        ll_out = -_LOG_2PI - math.log(var_out) - 0.5 * np.sum(e * e, axis=1) / var_out
        ll = np.logaddexp(math.log1p(-share) + ll, math.log(share) + ll_out)
    nll = -float(np.sum(ll)) + 0.5 * (theta[0] / _LOG_A_PRIOR_SD) ** 2
    return nll if math.isfinite(nll) else math.inf


def _nelder_mead(f, x0, step, iters=3000, tol=1e-9):
    """Minimise ``f`` from ``x0`` (simplex of ``step``); return ``(x, f(x))``."""
    n = len(x0)
    pts = [np.asarray(x0, float)] + [np.asarray(x0, float) + step * np.eye(n)[i]
                                     for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (1.0 + abs(vals[0])) and \
                max(np.max(np.abs(p - pts[0])) for p in pts[1:]) < 1e-7:
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2.0 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid) if fr >= vals[-1] else \
                centroid + 0.5 * (xr - centroid)
            fc = f(xc)
            if fc < min(fr, vals[-1]):
                pts[-1], vals[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = pts[0] + 0.5 * (pts[i] - pts[0])
                    vals[i] = f(pts[i])
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def fit(errors_en, search_covs, confidences, outliers=True):
    """Fit a :class:`CovarianceModel` by maximum likelihood of the errors; return it.

    Args:
        errors_en: ``[N, 2]`` east/north offsets of the truth from each fix, metres.
        search_covs: ``[N, 2, 2]`` the search's covariances of those fixes, m^2.
        confidences: ``[N]`` the search's confidences (0..1).
        outliers: model far misses as a second, broad Gaussian (see the module docstring);
            False fits one Gaussian to every error.

    Rows with a non-finite error or covariance (queries without a fix) are left out. Raises
    InputError with fewer than 4 usable rows (or 10 with ``outliers``).
    """
    e = np.asarray(errors_en, dtype=float).reshape(-1, 2)
    s = np.asarray(search_covs, dtype=float).reshape(-1, 2, 2)
    c = np.asarray(confidences, dtype=float).reshape(-1)
    if not len(e) == len(s) == len(c):
        raise InputError(f'calibration data have {len(e)} errors, {len(s)} covariances and '
                         f'{len(c)} confidences; give one of each per fix')
    ok = np.all(np.isfinite(e), axis=1) & np.all(np.isfinite(s), axis=(1, 2))
    e, s = e[ok], 0.5 * (s[ok] + np.swapaxes(s[ok], 1, 2))
    c = np.clip(np.nan_to_num(c[ok], nan=0.0), 0.0, 1.0)
    need = 10 if outliers else 4
    if len(e) < need:
        raise InputError(f'calibration needs at least {need} fixes with a finite error, got '
                         f'{len(e)}; use a larger split')
    r2 = np.sum(e * e, axis=1) / 2.0  # per-axis squared error
    med = float(np.median(r2))
    strace = float(np.median(0.5 * (s[:, 0, 0] + s[:, 1, 1]))) + 1e-6
    best = None
    # A few starts: the error floor near the small errors, the search's spread matching them,
    # and (with outliers) the broad component near the large ones.
    for frac_a, frac_b in ((0.5, 0.5), (0.05, 1.0), (1.0, 0.05)):
        x0 = [math.log(max(frac_a * med / strace, 1e-6)), math.log(frac_b * med + 1.0),
              math.log(0.25 * med + 1.0)]
        if outliers:
            x0 += [0.0, math.log(max(float(np.mean(r2)) / max(med, 1e-6), 1.0) * 4.0)]
        x, v = _nelder_mead(lambda t: _negloglik(t, e, s, c, outliers), np.array(x0), 1.0)
        x, v = _nelder_mead(lambda t: _negloglik(t, e, s, c, outliers), x, 0.1)
        if best is None or v < best[1]:
            best = (x, v)
    x = best[0]
    return CovarianceModel(
        a=float(math.exp(x[0])),
        b0_m=float(math.sqrt(MIN_SIGMA_M ** 2 + math.exp(x[1]))),
        b1_m=float(math.sqrt(math.exp(x[2]))),
        outlier_share=float(1.0 / (1.0 + math.exp(-x[3]))) if outliers else 0.0,
        outlier_sigma_m=float(math.sqrt(_outlier_var(
            x, 0.5 * float(np.mean(s[:, 0, 0] + s[:, 1, 1])), float(np.mean(c)))))
        if outliers else None)


def rescale_to_nees(model, errors_en, search_covs, confidences, within_m=100.0, target=2.0,
                    min_fixes=10):
    """Return ``(model scaled so the NEES of fixes within within_m is target, the scale)``.

    The mixture fit describes the fixes near the truth with a Gaussian that leaves the far
    misses out; fixes between its spread and ``within_m`` (which a filter's Mahalanobis gate
    may still accept) then have NEES well above 2. One scale ``k`` on the whole published
    covariance (``a``, ``b0_m^2`` and ``b1_m^2`` times ``k``) makes the mean NEES of the fixes
    within ``within_m`` of the fitting data equal ``target`` (2 in 2-D). Returns the model
    unchanged and scale 1.0 with fewer than ``min_fixes`` such fixes.
    """
    e = np.asarray(errors_en, dtype=float).reshape(-1, 2)
    s = np.asarray(search_covs, dtype=float).reshape(-1, 2, 2)
    c = np.asarray(confidences, dtype=float).reshape(-1)
    near = np.all(np.isfinite(e), axis=1) & (np.hypot(e[:, 0], e[:, 1]) <= within_m)
    if near.sum() < min_fixes:
        return model, 1.0
    v = nees(e[near], model.apply(s[near], c[near]))
    k = float(np.mean(v[np.isfinite(v)])) / target
    if not math.isfinite(k) or k <= 0:
        return model, 1.0
    return CovarianceModel(a=model.a * k, b0_m=max(model.b0_m * math.sqrt(k), MIN_SIGMA_M),
                           b1_m=model.b1_m * math.sqrt(k), outlier_share=model.outlier_share,
                           outlier_sigma_m=model.outlier_sigma_m), k


def nees_summary(errors_en, covs, near_m=100.0):
    """Return ``{'nees_mean', 'nees_mean_within_100m', 'n', 'n_within_100m'}`` of fixes.

    ``near_m`` picks the fixes within that many metres for the second mean (the 2-D target
    is a mean of 2; rows without a fix are left out).
    """
    e = np.asarray(errors_en, dtype=float).reshape(-1, 2)
    v = nees(e, covs)
    ok = np.isfinite(v)
    near = ok & (np.hypot(e[:, 0], e[:, 1]) <= near_m)
    return {'nees_mean': float(v[ok].mean()) if ok.any() else None,
            f'nees_mean_within_{near_m:g}m': float(v[near].mean()) if near.any() else None,
            'n': int(ok.sum()), f'n_within_{near_m:g}m': int(near.sum())}


def fit_gate(errors_m, confidences, precision=DEFAULT_GATE_PRECISION,
             within_m=DEFAULT_GATE_WITHIN_M, min_fixes=MIN_GATE_FIXES):
    """Choose a confidence gate on validation fixes; return its JSON-ready description.

    The threshold is the lowest confidence at which the fixes kept (``confidence >=
    threshold``) lie within ``within_m`` metres of the truth at ``precision`` or better, among
    thresholds that keep at least ``min_fixes`` fixes: the most fixes a filter can be given at
    that precision. Queries without a fix (NaN error) count in the published share's
    denominator. ``min_confidence`` is None when no threshold reaches the precision; the
    dict then says the best precision seen.
    """
    err = np.asarray(errors_m, dtype=float).reshape(-1)
    conf = np.asarray(confidences, dtype=float).reshape(-1)
    if len(err) != len(conf):
        raise InputError(f'gate data have {len(err)} errors and {len(conf)} confidences; give '
                         'one of each per query')
    if not 0.0 < precision <= 1.0 or not within_m > 0 or min_fixes < 1:
        raise InputError(f'gate precision {precision} must be in (0, 1], within_m {within_m} '
                         f'positive and min_fixes {min_fixes} at least 1')
    fixed = np.isfinite(err)
    thr, prec, _ = precision_recall(np.where(fixed, conf, np.nan), fixed & (err <= within_m))
    ranked = np.sort(conf[fixed & np.isfinite(conf)])
    kept = len(ranked) - np.searchsorted(ranked, thr, side='left')  # fixes with conf >= thr
    valid = kept >= min_fixes
    out = {'target_precision': float(precision), 'within_m': float(within_m),
           'min_fixes': int(min_fixes), 'n_queries': int(len(err))}
    hit = np.flatnonzero(valid & (prec >= precision))
    if not len(hit):
        best = float(prec[valid].max()) if valid.any() else None
        return out | {'min_confidence': None, 'best_precision': best}
    i = int(hit[-1])
    return out | {'min_confidence': float(thr[i]), 'precision': float(prec[i]),
                  'published': int(kept[i]), 'published_share': float(kept[i] / len(err))}
