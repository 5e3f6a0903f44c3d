"""Fusion replay: odometry, IMU and geozoom fixes through an EKF like robot_localization's.

The filter is the planar (``two_d_mode``) subset of robot_localization's state, built on
filterpy's :class:`~filterpy.kalman.ExtendedKalmanFilter`::

    state = [x, y, yaw, vx, vy, vyaw]

``x``, ``y`` are metres in the map frame (East-North-Up about the datum, REP-103/105), ``yaw``
radians counter-clockwise from east, ``vx``, ``vy`` m/s in base_link and ``vyaw`` rad/s. The
motion model is robot_localization's omnidirectional constant-velocity model; the process
noise (per second, scaled by the time step), the initial covariance, which fields each sensor
contributes and the Mahalanobis rejection threshold of the fix all come from
``config/ekf.yaml`` (the ``ekf_map`` instance that fuses the fix), so the replay behaves as the
filter that runs on the robot:

- wheel odometry (``odom0``): the twist components its ``odom0_config`` selects, with the
  message's twist covariance;
- IMU (``imu0``): earth-referenced yaw and yaw rate as ``imu0_config`` selects, with the
  message's covariances;
- the geozoom fix (the ``odomN`` input whose config selects x and y, ``/odometry/gps``):
  position with the fix covariance, rejected when its squared Mahalanobis distance from the
  prediction reaches ``odomN_pose_rejection_threshold`` squared (as robot_localization does).

Measurements are processed in stamp order. :func:`align_odometry` gives the odometry-only
trajectory, aligned once at the start with the true initial pose (as the map EKF is
initialised), and :func:`trajectory_errors` the ATE RMSE, final and maximum error against the
ground truth (no post-hoc fitting: every trajectory is already in the map frame).
"""

from dataclasses import dataclass, field
import math
from pathlib import Path
import sys

import numpy as np

from geozoom_ros.errors import ConfigError, InputError

#: State components, in order.
STATE = ('x', 'y', 'yaw', 'vx', 'vy', 'vyaw')
#: Index of each planar state component in robot_localization's 15-value vectors
#: ``[x, y, z, roll, pitch, yaw, vx, vy, vz, vroll, vpitch, vyaw, ax, ay, az]``.
RL_INDEX = {'x': 0, 'y': 1, 'yaw': 5, 'vx': 6, 'vy': 7, 'vyaw': 11}
_RL_NAMES = ('x', 'y', 'z', 'roll', 'pitch', 'yaw', 'vx', 'vy', 'vz', 'vroll', 'vpitch', 'vyaw',
             'ax', 'ay', 'az')
#: Fields of the 15 that a planar filter never estimates (held at zero in two_d_mode).
_OUT_OF_PLANE = {'z', 'roll', 'pitch', 'vz', 'vroll', 'vpitch'}
#: What the replay can take from each kind of input.
ODOM_FIELDS = ('vx', 'vy', 'vyaw')
IMU_FIELDS = ('yaw', 'vyaw')
#: Variance floor of any measurement (keeps a zero covariance in a message from making the
#: filter singular).
MIN_VARIANCE = 1e-9


def default_ekf_config_path():
    """Return the path of ``config/ekf.yaml`` (source tree or installed share), or None."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / 'config' / 'ekf.yaml',
                  Path(sys.prefix) / 'share' / 'geozoom_ros' / 'config' / 'ekf.yaml']
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory('geozoom_ros')) / 'config' /
                          'ekf.yaml')
    except Exception:  # noqa: B902 - no ament index (or no AMENT_PREFIX_PATH): not installed
        pass
    return next((p for p in candidates if p.is_file()), None)


@dataclass
class FusionConfig:
    """EKF settings, as read from one robot_localization section of ``ekf.yaml``.

    Attributes:
        process_noise: (6,) variance growth per second of [x, y, yaw, vx, vy, vyaw]
            (m^2/s, rad^2/s, (m/s)^2/s, (rad/s)^2/s).
        initial_covariance: (6,) initial variances of the state.
        rejection_threshold: Mahalanobis gate of the fix, in standard deviations.
        odom_topic, odom_fields: the wheel-odometry topic and the twist fields fused.
        imu_topic, imu_fields: the IMU topic (None = no IMU input) and the fields fused.
        fix_topic: the name of the fix input in the file (for the report).
        init_position_sigma_m: 1-sigma (metres) of the start position when the filter starts
            at a known pose (the true initial pose); ekf.yaml's initial position variance
            applies when it starts from the first fix.
        source: the file the values came from.
    """

    process_noise: np.ndarray
    initial_covariance: np.ndarray
    rejection_threshold: float = 3.0
    odom_topic: str = '/odom'
    odom_fields: tuple = ('vx', 'vy', 'vyaw')
    imu_topic: str = None
    imu_fields: tuple = ('yaw', 'vyaw')
    fix_topic: str = '/odometry/gps'
    init_position_sigma_m: float = 2.0
    source: str = ''
    ignored: list = field(default_factory=list)

    def to_json(self):
        """Return a JSON-ready dict of the settings."""
        return {'source': self.source, 'state': list(STATE),
                'process_noise': [float(v) for v in self.process_noise],
                'initial_covariance': [float(v) for v in self.initial_covariance],
                'rejection_threshold_sigmas': float(self.rejection_threshold),
                'odom_topic': self.odom_topic, 'odom_fields': list(self.odom_fields),
                'imu_topic': self.imu_topic, 'imu_fields': list(self.imu_fields),
                'init_position_sigma_m': float(self.init_position_sigma_m),
                'ignored': list(self.ignored)}


def _diag15(values, name, where):
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 225:  # a full 15x15 matrix, as robot_localization also accepts
        v = np.diag(v.reshape(15, 15))
    if v.size != 15 or not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ConfigError(f'{where}: {name} must hold 15 (diagonal) or 225 non-negative '
                          f'numbers, got {v.size}')
    return v


def _flags(values, name, where):
    if not isinstance(values, (list, tuple)) or len(values) != 15 or \
            not all(isinstance(b, bool) for b in values):
        raise ConfigError(f'{where}: {name} must be a list of 15 true/false values')
    return {_RL_NAMES[i] for i, b in enumerate(values) if b}


def load_ekf_config(path=None, section='ekf_map'):
    """Read a robot_localization section of an ``ekf.yaml``; return a :class:`FusionConfig`.

    ``path`` defaults to the package's ``config/ekf.yaml``. The odometry input is ``odom0``,
    the IMU ``imu0`` (optional) and the fix the first ``odomN`` whose config selects x and y.
    Raises ConfigError (one line) for a missing section, a malformed list, or a field the
    planar replay cannot fuse.
    """
    import yaml

    path = Path(path) if path else default_ekf_config_path()
    if path is None:
        raise ConfigError('config/ekf.yaml not found; pass --ekf-config PATH')
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f'EKF config {path}: {exc.strerror}; pass an existing ekf.yaml') \
            from None
    except yaml.YAMLError:
        raise ConfigError(f'EKF config {path} is not valid YAML; fix its syntax') from None
    where = f'EKF config {path}'
    try:
        p = data[section]['ros__parameters']
    except (KeyError, TypeError):
        raise ConfigError(f'{where} has no {section}: ros__parameters section; see '
                          'config/ekf.yaml') from None
    where = f'{where} [{section}]'
    for key in ('process_noise_covariance', 'initial_estimate_covariance', 'odom0',
                'odom0_config'):
        if key not in p:
            raise ConfigError(f'{where} lacks {key}')
    q = _diag15(p['process_noise_covariance'], 'process_noise_covariance', where)
    p0 = _diag15(p['initial_estimate_covariance'], 'initial_estimate_covariance', where)
    idx = [RL_INDEX[s] for s in STATE]
    ignored = []

    odom_flags = _flags(p['odom0_config'], 'odom0_config', where)
    bad = odom_flags - set(ODOM_FIELDS) - _OUT_OF_PLANE
    if bad and not p.get('odom0_differential', False):
        raise ConfigError(f'{where}: odom0_config selects {", ".join(sorted(bad))}; the replay '
                          f'fuses only the odometry twist ({", ".join(ODOM_FIELDS)})')
    ignored += sorted(f'odom0 {f}' for f in odom_flags - set(ODOM_FIELDS))
    odom_fields = tuple(f for f in ODOM_FIELDS if f in odom_flags)

    imu_topic, imu_fields = None, ()
    if 'imu0' in p:
        imu_flags = _flags(p.get('imu0_config', [False] * 15), 'imu0_config', where)
        imu_fields = tuple(f for f in IMU_FIELDS if f in imu_flags)
        ignored += sorted(f'imu0 {f}' for f in imu_flags - set(IMU_FIELDS))
        imu_topic = str(p['imu0']) if imu_fields else None

    fix_name = None
    for k in sorted(p):
        if k.startswith('odom') and k[4:].isdigit() and k != 'odom0':
            flags = _flags(p.get(f'{k}_config', [False] * 15), f'{k}_config', where)
            if {'x', 'y'} <= flags:
                fix_name = k
                break
    if fix_name is None:
        raise ConfigError(f'{where}: no odomN input fuses x and y (the geozoom fix through '
                          'navsat_transform_node); use the ekf_map section')
    thr = float(p.get(f'{fix_name}_pose_rejection_threshold', math.inf))
    if not thr > 0:
        raise ConfigError(f'{where}: {fix_name}_pose_rejection_threshold={thr} must be positive')
    return FusionConfig(process_noise=q[idx], initial_covariance=p0[idx],
                        rejection_threshold=thr, odom_topic=str(p['odom0']),
                        odom_fields=odom_fields, imu_topic=imu_topic, imu_fields=imu_fields,
                        fix_topic=str(p[fix_name]), source=str(path), ignored=ignored)


# --------------------------------------------------------------------------------------------
# Inputs

@dataclass
class OdometrySeries:
    """``nav_msgs/Odometry`` samples sorted by stamp (seconds on the bag's clock).

    ``x``, ``y`` metres and ``yaw`` radians of base_link in the odom frame; ``vx``, ``vy``
    m/s and ``vyaw`` rad/s in base_link; ``twist_var`` (K, 3) their variances.
    """

    t: np.ndarray
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    vyaw: np.ndarray
    twist_var: np.ndarray

    def __len__(self):
        return len(self.t)


@dataclass
class ImuSeries:
    """``sensor_msgs/Imu`` samples sorted by stamp: ENU ``yaw`` (rad), ``vyaw`` (rad/s)."""

    t: np.ndarray
    yaw: np.ndarray
    yaw_var: np.ndarray
    vyaw: np.ndarray
    vyaw_var: np.ndarray

    def __len__(self):
        return len(self.t)


@dataclass
class Pose2D:
    """A planar pose at time ``t`` (s): ``x``, ``y`` metres, ``yaw`` radians (map frame)."""

    t: float
    x: float
    y: float
    yaw: float


def wrap_angle(a):
    """Return angles (radians) wrapped to [-pi, pi)."""
    return (np.asarray(a) + math.pi) % (2.0 * math.pi) - math.pi


# --------------------------------------------------------------------------------------------
# The filter

def _make_filterpy_ekf():
    from filterpy.kalman import ExtendedKalmanFilter

    class _PlanarEkf(ExtendedKalmanFilter):
        """filterpy's EKF with robot_localization's nonlinear constant-velocity prediction."""

        dt = 0.0

        def predict_x(self, u=0):
            x = self.x[:, 0]
            c, s = math.cos(x[2]), math.sin(x[2])
            dt = self.dt
            self.x = self.x.copy()
            self.x[0, 0] += (c * x[3] - s * x[4]) * dt
            self.x[1, 0] += (s * x[3] + c * x[4]) * dt
            self.x[2, 0] = float(wrap_angle(x[2] + x[5] * dt))

    return _PlanarEkf(dim_x=6, dim_z=2)


def _yaw_residual(a, b):
    r = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    r[0] = wrap_angle(r[0])
    return r


class PlanarEkf:
    """The replay filter (see the module docstring); times in seconds on the bag's clock.

    Args:
        config: a :class:`FusionConfig`.
        start: the :class:`Pose2D` the filter starts at.
        position_sigma_m: 1-sigma of the start position (metres); None = ekf.yaml's initial
            position variance (a start that the first fixes decide).
        yaw_sigma_rad: 1-sigma of the start yaw (radians); None = ekf.yaml's.
    """

    def __init__(self, config, start, position_sigma_m=None, yaw_sigma_rad=None):
        self.config = config
        self.kf = _make_filterpy_ekf()
        self.kf.x = np.array([[start.x], [start.y], [start.yaw], [0.0], [0.0], [0.0]])
        p0 = np.array(config.initial_covariance, dtype=float)
        if position_sigma_m is not None:
            p0[0] = p0[1] = float(position_sigma_m) ** 2
        if yaw_sigma_rad is not None:
            p0[2] = float(yaw_sigma_rad) ** 2
        self.kf.P = np.diag(np.maximum(p0, MIN_VARIANCE))
        self.t = float(start.t)
        self._q = np.diag(np.asarray(config.process_noise, dtype=float))
        self._odom_idx = [3 + ODOM_FIELDS.index(f) for f in config.odom_fields]
        self._imu_fields = tuple(config.imu_fields)
        self._thr2 = float(config.rejection_threshold) ** 2

    @property
    def state(self):
        """The state vector (6,) [x, y, yaw, vx, vy, vyaw]."""
        return self.kf.x[:, 0].copy()

    @property
    def position_cov(self):
        """The 2x2 covariance (m^2) of (x, y)."""
        return self.kf.P[:2, :2].copy()

    def predict_to(self, t):
        """Advance the filter to time ``t`` (s); an earlier ``t`` leaves it where it is."""
        dt = float(t) - self.t
        if dt <= 0:
            return
        x = self.kf.x[:, 0]
        c, s = math.cos(x[2]), math.sin(x[2])
        F = np.eye(6)
        F[0, 2] = (-s * x[3] - c * x[4]) * dt
        F[0, 3], F[0, 4] = c * dt, -s * dt
        F[1, 2] = (c * x[3] - s * x[4]) * dt
        F[1, 3], F[1, 4] = s * dt, c * dt
        F[2, 5] = dt
        self.kf.F = F
        self.kf.Q = self._q * dt
        self.kf.dt = dt
        self.kf.predict()
        self.t = float(t)

    def _update(self, z, idx, var, residual=np.subtract):
        H = np.zeros((len(idx), 6))
        H[np.arange(len(idx)), idx] = 1.0
        R = np.diag(np.maximum(np.asarray(var, dtype=float), MIN_VARIANCE))
        self.kf.update(np.asarray(z, dtype=float).reshape(-1, 1), lambda x: H,
                       lambda x: H @ x, R=R, residual=residual)
        self.kf.x[2, 0] = float(wrap_angle(self.kf.x[2, 0]))

    def update_odometry(self, vx, vy, vyaw, twist_var):
        """Fuse the odometry twist fields the config selects (m/s, rad/s; variances)."""
        if not self._odom_idx:
            return
        values = {3: vx, 4: vy, 5: vyaw}
        variances = {3: twist_var[0], 4: twist_var[1], 5: twist_var[2]}
        self._update([values[i] for i in self._odom_idx], self._odom_idx,
                     [variances[i] for i in self._odom_idx])

    def update_imu(self, yaw, yaw_var, vyaw, vyaw_var):
        """Fuse the IMU's ENU yaw (rad) and yaw rate (rad/s) as the config selects."""
        if 'yaw' in self._imu_fields and math.isfinite(yaw) and math.isfinite(yaw_var):
            self._update([yaw], [2], [yaw_var], residual=_yaw_residual)
        if 'vyaw' in self._imu_fields and math.isfinite(vyaw) and math.isfinite(vyaw_var):
            self._update([vyaw], [5], [vyaw_var])

    def mahalanobis2(self, xy, cov):
        """Return the squared Mahalanobis distance of a position (m) from the prediction."""
        y = np.asarray(xy, dtype=float).reshape(2) - self.kf.x[:2, 0]
        S = self.kf.P[:2, :2] + np.asarray(cov, dtype=float).reshape(2, 2)
        return float(y @ np.linalg.solve(S, y))

    def update_position(self, xy, cov):
        """Gate and fuse a position fix (m, 2x2 m^2); return ``(accepted, d2)``.

        Rejected when the squared Mahalanobis distance reaches the threshold squared, as
        robot_localization does.
        """
        d2 = self.mahalanobis2(xy, cov)
        if not d2 < self._thr2:
            return False, d2
        H = np.zeros((2, 6))
        H[0, 0] = H[1, 1] = 1.0
        cov = 0.5 * (np.asarray(cov, dtype=float) + np.asarray(cov, dtype=float).T)
        self.kf.update(np.asarray(xy, dtype=float).reshape(2, 1), lambda x: H,
                       lambda x: H @ x, R=cov)
        self.kf.x[2, 0] = float(wrap_angle(self.kf.x[2, 0]))
        return True, d2


# --------------------------------------------------------------------------------------------
# Replay

@dataclass
class FixInput:
    """Position fixes for the filter: ``t`` (K,) s, ``xy`` (K, 2) m, ``cov`` (K, 2, 2) m^2."""

    t: np.ndarray
    xy: np.ndarray
    cov: np.ndarray

    def __len__(self):
        return len(self.t)

    @classmethod
    def empty(cls):
        """Return a FixInput with no fixes."""
        return cls(np.zeros(0), np.zeros((0, 2)), np.zeros((0, 2, 2)))


@dataclass
class FusionTrack:
    """The filter's output after every odometry sample, and what became of each fix.

    ``t`` (K,) s, ``xy`` (K, 2) m, ``yaw`` (K,) rad, ``cov`` (K, 2, 2) m^2;
    ``fix_accepted`` (F,) True/False per input fix (False also for a fix before the start),
    ``fix_d2`` (F,) its squared Mahalanobis distance (NaN when not tested).
    """

    t: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray
    cov: np.ndarray
    fix_accepted: np.ndarray
    fix_d2: np.ndarray

    @property
    def rejected(self):
        """Number of fixes the Mahalanobis gate rejected."""
        return int(np.sum(np.isfinite(self.fix_d2) & ~self.fix_accepted))

    @property
    def accepted(self):
        """Number of fixes fused."""
        return int(np.sum(self.fix_accepted))


class OnlineFusion:
    """Feeds a :class:`PlanarEkf` in stamp order, up to any time asked for.

    Used by :func:`fuse` for the offline replay, and frame by frame for the search prior
    (``--prior fused``): ``advance(t)`` processes the odometry and IMU up to ``t`` and
    predicts to it; ``add_fix`` fuses one fix at the filter's time.
    """

    def __init__(self, config, odom, start, imu=None, position_sigma_m=None,
                 yaw_sigma_rad=None):
        if odom is None or len(odom) == 0:
            raise InputError('the fusion replay needs odometry; the bag has none on '
                             f'{config.odom_topic}')
        self.ekf = PlanarEkf(config, start, position_sigma_m, yaw_sigma_rad)
        self.odom, self.imu = odom, imu if (imu is not None and len(imu)) else None
        self._i_odom = int(np.searchsorted(odom.t, start.t, side='left'))
        self._i_imu = 0 if self.imu is None else int(np.searchsorted(self.imu.t, start.t))
        self.out_t, self.out_xy, self.out_yaw, self.out_cov = [], [], [], []

    def _record(self):
        x = self.ekf.kf.x[:, 0]
        self.out_t.append(self.ekf.t)
        self.out_xy.append((x[0], x[1]))
        self.out_yaw.append(x[2])
        self.out_cov.append(self.ekf.kf.P[:2, :2].copy())

    def advance(self, t):
        """Process every odometry and IMU sample with stamp <= ``t``; predict to ``t``."""
        odom, imu = self.odom, self.imu
        while True:
            t_o = odom.t[self._i_odom] if self._i_odom < len(odom) else math.inf
            t_i = imu.t[self._i_imu] if imu is not None and self._i_imu < len(imu) \
                else math.inf
            if math.isinf(min(t_o, t_i)) or min(t_o, t_i) > t:
                break
            if t_i < t_o:
                k = self._i_imu
                self.ekf.predict_to(t_i)
                self.ekf.update_imu(imu.yaw[k], imu.yaw_var[k], imu.vyaw[k], imu.vyaw_var[k])
                self._i_imu += 1
            else:
                k = self._i_odom
                self.ekf.predict_to(t_o)
                self.ekf.update_odometry(odom.vx[k], odom.vy[k], odom.vyaw[k],
                                         odom.twist_var[k])
                self._i_odom += 1
                self._record()
        if math.isfinite(t):
            self.ekf.predict_to(t)

    def add_fix(self, t, xy, cov):
        """Advance to ``t`` and gate/fuse a fix; return ``(accepted, d2)``."""
        self.advance(t)
        return self.ekf.update_position(xy, cov)

    def track(self, fix_accepted, fix_d2):
        """Return the :class:`FusionTrack` recorded so far."""
        n = len(self.out_t)
        return FusionTrack(np.asarray(self.out_t, dtype=float),
                           np.asarray(self.out_xy, dtype=float).reshape(n, 2),
                           np.asarray(self.out_yaw, dtype=float),
                           np.asarray(self.out_cov, dtype=float).reshape(n, 2, 2),
                           np.asarray(fix_accepted, dtype=bool),
                           np.asarray(fix_d2, dtype=float))


def fuse(config, odom, start, fixes=None, imu=None, position_sigma_m=None, yaw_sigma_rad=None):
    """Replay odometry (+ IMU) and fixes through the EKF; return a :class:`FusionTrack`.

    ``fixes`` is a :class:`FixInput` in the map frame (None = dead reckoning with the same
    filter). Fixes stamped before ``start.t`` are not fused (``fix_accepted`` False, d2 NaN).
    """
    fixes = fixes if fixes is not None else FixInput.empty()
    run = OnlineFusion(config, odom, start, imu, position_sigma_m, yaw_sigma_rad)
    order = np.argsort(fixes.t, kind='stable')
    accepted = np.zeros(len(fixes), bool)
    d2 = np.full(len(fixes), np.nan)
    for k in order:
        if fixes.t[k] < start.t:
            continue
        accepted[k], d2[k] = run.add_fix(fixes.t[k], fixes.xy[k], fixes.cov[k])
    run.advance(math.inf)
    return run.track(accepted, d2)


# --------------------------------------------------------------------------------------------
# Odometry alone, and errors

def odom_to_map_transform(odom_pose, map_pose):
    """Return the map<-odom transform ``(tx, ty, theta)`` (metres, radians).

    It puts ``odom_pose`` (x, y, yaw in the odom frame) on ``map_pose`` (x, y, yaw in the map
    frame).
    """
    ox, oy, oyaw = odom_pose
    mx, my, myaw = map_pose
    theta = float(wrap_angle(myaw - oyaw))
    c, s = math.cos(theta), math.sin(theta)
    return mx - (c * ox - s * oy), my - (s * ox + c * oy), theta


def align_odometry(odom, transform):
    """Return the odometry positions (K, 2) in the map frame through ``(tx, ty, theta)``."""
    tx, ty, theta = transform
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([tx + c * odom.x - s * odom.y, ty + s * odom.x + c * odom.y], axis=1)


@dataclass
class TrajectoryErrors:
    """Position errors (m) of a trajectory at the ground-truth times it spans.

    ``t`` (N,) s, ``error`` (N,) m; ``ate_rmse_m`` the root mean square, ``final_error_m``
    the error at the last ground-truth time within the trajectory, ``max_error_m``.
    """

    t: np.ndarray
    error: np.ndarray
    ate_rmse_m: float
    final_error_m: float
    max_error_m: float
    mean_error_m: float

    def to_json(self):
        """Return the summary figures as a JSON-ready dict (metres)."""
        return {'ate_rmse_m': self.ate_rmse_m, 'final_error_m': self.final_error_m,
                'max_error_m': self.max_error_m, 'mean_error_m': self.mean_error_m,
                'samples': int(len(self.t))}


def interpolate_xy(t, xy, t_query):
    """Return positions (Q, 2) linearly interpolated at ``t_query``; NaN outside ``t``."""
    t = np.asarray(t, dtype=float)
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    q = np.asarray(t_query, dtype=float)
    out = np.full((len(q), 2), np.nan)
    if len(t) == 0:
        return out
    inside = (q >= t[0]) & (q <= t[-1])
    for k in range(2):
        out[inside, k] = np.interp(q[inside], t, xy[:, k])
    return out


def trajectory_errors(t_est, xy_est, t_ref, xy_ref):
    """Compare a trajectory with the reference at the reference times it spans.

    Returns :class:`TrajectoryErrors`; with no overlap its figures are NaN.
    """
    est = interpolate_xy(t_est, xy_est, t_ref)
    ref = np.asarray(xy_ref, dtype=float).reshape(-1, 2)
    ok = np.all(np.isfinite(est), axis=1) & np.all(np.isfinite(ref), axis=1)
    t = np.asarray(t_ref, dtype=float)[ok]
    e = np.linalg.norm(est[ok] - ref[ok], axis=1)
    if e.size == 0:
        nan = float('nan')
        return TrajectoryErrors(t, e, nan, nan, nan, nan)
    return TrajectoryErrors(t, e, float(np.sqrt(np.mean(e ** 2))), float(e[np.argmax(t)]),
                            float(e.max()), float(e.mean()))
