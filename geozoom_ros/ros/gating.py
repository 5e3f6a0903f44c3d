"""The node's ROS-free logic: gate, priors, headings, covariances, newest-frame slot.

Shared by the node (``geozoom_ros.ros.node``) and the offline bag evaluation
(``geozoom_ros.eval.bag``), so a replayed drive is judged by exactly what the node publishes.
Imports neither rclpy nor torch.
"""

from dataclasses import dataclass, field
import math
import threading
import time

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.geo import EARTH_RADIUS_M
from geozoom_ros.search import Prior

#: sensor_msgs/NavSatStatus.STATUS_NO_FIX and NavSatFix.COVARIANCE_TYPE_UNKNOWN.
STATUS_NO_FIX = -1
COVARIANCE_TYPE_UNKNOWN = 0

#: Variance floor (m^2) of a published horizontal axis: the fix is a cell centre and can never
#: be known better than a metre, whatever the search says.
MIN_VARIANCE_M2 = 1.0
#: Variance (m^2) of what the camera cannot observe: altitude, and the pose's orientation.
UNKNOWN_VARIANCE = 1e6
#: Seconds of frame arrivals over which the input rate is measured.
RATE_WINDOW_S = 5.0


def stamp_ns(stamp):
    """Return a ``builtin_interfaces/Time`` as integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def yaw_from_quaternion(x, y, z, w):
    """Return the yaw (radians, about +z, counter-clockwise) of a quaternion.

    Raises InputError for a non-finite or far-from-unit quaternion (a driver's "no
    orientation" is often all zeros).
    """
    q = np.array([x, y, z, w], dtype=float)
    if not np.all(np.isfinite(q)):
        raise InputError(f'orientation quaternion {q.tolist()} is not finite')
    n = float(np.linalg.norm(q))
    if abs(n - 1.0) > 0.1:
        raise InputError(f'orientation quaternion {q.tolist()} has norm {n:.3f}, not 1: the '
                         'source gives no orientation')
    x, y, z, w = q / n
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def compass_heading_deg(enu_yaw_rad, offset_deg=0.0):
    """Return the compass heading (degrees clockwise from north, 0..360) of an ENU yaw."""
    return (90.0 - math.degrees(enu_yaw_rad) + offset_deg) % 360.0


def rotate_cov(cov, angle_rad):
    """Return ``R cov R^T`` for a 2x2 covariance and a counter-clockwise rotation R."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    r = np.array([[c, -s], [s, c]])
    out = r @ np.asarray(cov, dtype=float) @ r.T
    return 0.5 * (out + out.T)


def safe_covariance_en(cov):
    """Return a symmetric 2x2 covariance (m^2) with eigenvalues >= MIN_VARIANCE_M2.

    Raises InputError for a non-finite matrix (a bug upstream; the frame gets no fix).
    """
    cov = np.asarray(cov, dtype=float).reshape(2, 2)
    if not np.all(np.isfinite(cov)):
        raise InputError(f'search covariance {cov.tolist()} is not finite')
    cov = 0.5 * (cov + cov.T)
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, MIN_VARIANCE_M2)
    return (vecs * vals) @ vecs.T


def offset_en_m(lat0, lon0, lat, lon):
    """Return ``(east, north)`` metres of a point from an origin (local tangent plane).

    Spherical small-offset approximation: well below a metre's error within a few km, which is
    plenty for comparing a fix with a prior.
    """
    east = math.radians(lon - lon0) * EARTH_RADIUS_M * math.cos(math.radians(lat0))
    north = math.radians(lat - lat0) * EARTH_RADIUS_M
    return east, north


def mahalanobis(prior, lat, lon):
    """Return the Mahalanobis distance (prior sigmas) of a point from a :class:`Prior`."""
    d = np.array(offset_en_m(prior.lat, prior.lon, lat, lon))
    return float(math.sqrt(max(0.0, d @ np.linalg.solve(prior.cov_en, d))))


def prior_from_odometry(msg, frame, datum_yaw, min_sigma_m):
    """Return a :class:`Prior` from a map-frame ``nav_msgs/Odometry``.

    The map frame is the ENU ``frame`` turned by ``datum_yaw`` (radians, counter-clockwise
    from east); ``min_sigma_m`` floors each axis's standard deviation (metres).
    """
    p = msg.pose.pose.position
    x, y = float(p.x), float(p.y)
    cov6 = np.asarray(msg.pose.covariance, dtype=float)
    if not (math.isfinite(x) and math.isfinite(y)) or cov6.size != 36 or \
            not np.all(np.isfinite(cov6[[0, 1, 6, 7]])):
        raise InputError(f'odometry prior position ({x}, {y}) or its covariance is not finite')
    c, s = math.cos(datum_yaw), math.sin(datum_yaw)
    east, north = c * x - s * y, s * x + c * y
    lat, lon, _ = frame.to_latlon(east, north, 0.0)
    cov = rotate_cov(cov6.reshape(6, 6)[:2, :2], datum_yaw)
    return _floored_prior(float(lat), float(lon), cov, min_sigma_m)


def prior_from_navsatfix(msg, min_sigma_m):
    """Return a :class:`Prior` from a ``sensor_msgs/NavSatFix`` (NO_FIX raises InputError)."""
    if int(msg.status.status) == STATUS_NO_FIX:
        raise InputError('NavSatFix prior has status NO_FIX')
    lat, lon = float(msg.latitude), float(msg.longitude)
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise InputError(f'NavSatFix prior ({lat}, {lon}) is not finite')
    cov9 = np.asarray(msg.position_covariance, dtype=float)
    if int(msg.position_covariance_type) == COVARIANCE_TYPE_UNKNOWN:
        cov = np.zeros((2, 2))
    else:
        if cov9.size != 9 or not np.all(np.isfinite(cov9)):
            raise InputError('NavSatFix prior covariance is not finite')
        cov = cov9.reshape(3, 3)[:2, :2]
    return _floored_prior(lat, lon, cov, min_sigma_m)


def _floored_prior(lat, lon, cov, min_sigma_m):
    cov = 0.5 * (np.asarray(cov, dtype=float) + np.asarray(cov, dtype=float).T)
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, float(min_sigma_m) ** 2)
    prior = Prior(lat, lon, (vecs * vals) @ vecs.T)
    prior.validate()
    return prior


class LatestFrame:
    """A one-slot queue where the newest item wins: a waiting item is replaced (and counted)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self.replaced = 0

    def put(self, item):
        """Store ``item``; return True if it replaced one that was never taken."""
        with self._cond:
            dropped = self._item is not None
            if dropped:
                self.replaced += 1
            self._item = item
            self._cond.notify()
            return dropped

    def take(self, timeout):
        """Return the waiting item (emptying the slot), or None after ``timeout`` seconds."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def pending(self):
        """Return the number of waiting items (0 or 1)."""
        with self._cond:
            return int(self._item is not None)

    def wake(self):
        """Wake a waiting ``take`` (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()


class Throttle:
    """Allows one message per kind every ``period_s`` seconds and counts the suppressed ones."""

    def __init__(self, period_s, clock=time.monotonic):
        self.period_s = float(period_s)
        self.clock = clock
        self._last = {}
        self._suppressed = {}

    def ready(self, kind):
        """Return ``(allowed, suppressed since the last allowed message)``."""
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.period_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False, 0
        self._last[kind] = now
        return True, self._suppressed.pop(kind, 0)


class PriorMonitor:
    """Decides whether the search uses the prior, from how fixes agree with it.

    ``count`` consecutive disagreeing fixes (outside the prior's gate, or no confident fix in
    the prior region) switch to whole-map search; there, the first confident whole-map fix
    that agrees with the prior switches back.
    """

    def __init__(self, count):
        self.count = int(count)
        self.streak = 0
        self.whole_map = False
        self.fallbacks = 0

    def observe(self, agrees):
        """Record one fix's (dis)agreement with the prior; return whether the mode changed."""
        if self.whole_map:
            if agrees:
                self.whole_map = False
                self.streak = 0
                return True
            return False
        self.streak = 0 if agrees else self.streak + 1
        if self.streak >= self.count:
            self.whole_map = True
            self.fallbacks += 1
            self.streak = 0
            return True
        return False


@dataclass
class Gate:
    """The node's gate: what is published as a FIX.

    A fix passes when its confidence reaches the threshold of the search that ran and its
    1-sigma radius (metres, of the covariance floored at :data:`MIN_VARIANCE_M2` per axis) is
    ``<= max_sigma_m``. The threshold is ``min_confidence``, or with ``gate_source``
    'calibration' the one ``geozoom calibrate`` fitted for that search
    (:meth:`use_calibration`; a search's confidences are not comparable across methods).
    The prior thresholds ride along because the node and the offline evaluation apply them
    together. Unset fields take the node's defaults (``config/localize.yaml``).
    """

    min_confidence: float = None
    max_sigma_m: float = None
    prior_min_sigma_m: float = None
    prior_disagree_count: int = None
    prior_disagree_sigmas: float = None
    gate_source: str = None
    calibrated: dict = field(default_factory=dict)

    def __post_init__(self):
        from geozoom_ros.ros.params import NodeParams

        defaults = NodeParams()
        for name in ('min_confidence', 'max_sigma_m', 'prior_min_sigma_m',
                     'prior_disagree_count', 'prior_disagree_sigmas', 'gate_source'):
            if getattr(self, name) is None:
                setattr(self, name, getattr(defaults, name))

    @classmethod
    def from_params(cls, p):
        """Return the gate of a :class:`~geozoom_ros.ros.params.NodeParams`."""
        return cls(p.min_confidence, p.max_sigma_m, p.prior_min_sigma_m,
                   p.prior_disagree_count, p.prior_disagree_sigmas, p.gate_source)

    @classmethod
    def from_params_file(cls, path):
        """Return the gate of a node parameters file (e.g. ``config/localize.yaml``)."""
        from geozoom_ros.ros.params import load_yaml

        return cls.from_params(load_yaml(path, require_paths=False))

    def use_calibration(self, calibration):
        """Take the per-method thresholds of a Calibration (or None) when gate_source says so.

        Returns the gate.
        """
        self.calibrated = calibration.gate_thresholds() \
            if calibration is not None and self.gate_source == 'calibration' else {}
        return self

    def threshold(self, method=None):
        """Return the confidence a fix of search ``method`` must reach."""
        return self.calibrated.get(method, self.min_confidence)

    def describe(self, method=None):
        """Return search ``method``'s threshold and its origin, e.g. ``'0.41 (calibration)'``."""
        origin = 'calibration' if method in self.calibrated else 'min_confidence'
        return f'{self.threshold(method):g} ({origin})'

    def passes(self, confidence, cov, method=None):
        """Return ``(gated_in, sigma_m, floored covariance)`` of one fix of search ``method``.

        Raises InputError for a non-finite covariance.
        """
        cov = safe_covariance_en(cov)
        sigma = math.sqrt(0.5 * float(np.trace(cov)))
        return (bool(confidence >= self.threshold(method) and sigma <= self.max_sigma_m),
                sigma, cov)

    def agrees_with(self, prior, lat, lon):
        """Return whether a fix lies within ``prior_disagree_sigmas`` of a prior."""
        return mahalanobis(prior, lat, lon) <= self.prior_disagree_sigmas

    def to_json(self):
        """Return the thresholds as a dict."""
        return {'min_confidence': self.min_confidence, 'max_sigma_m': self.max_sigma_m,
                'gate_source': self.gate_source,
                'calibrated_min_confidence': dict(sorted(self.calibrated.items()))}
