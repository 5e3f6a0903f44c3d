"""Replay a recorded drive (rosbag2, sqlite3 or MCAP) through the localizer and score it.

The engine behind ``geozoom eval-bag``:

1. :func:`read_bag` opens the bag with rosbags, picks the camera topic
   (``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage``) and reads the small topics in
   full: the ground truth (``sensor_msgs/NavSatFix``), the wheel odometry
   (``nav_msgs/Odometry``) and the IMU (``sensor_msgs/Imu``). Stamps are the messages' header
   stamps (the bag's receive time where a header stamp is zero); every series is sorted by
   stamp and duplicate stamps keep their first message, and both are counted.
2. :func:`localize_frames` runs :class:`~geozoom_ros.localizer.GeoZoomLocalizer` (the
   localizer the node runs) on every, or every Nth, camera frame, with the node's gate
   (``min_confidence``, ``max_sigma_m`` of ``config/localize.yaml``) and optionally the
   fused estimate as the search prior, as the node does with ``prior_source: odometry``.
3. :func:`evaluate` matches the ground truth to each frame by timestamp (linear
   interpolation between the two samples around it), scores the fixes
   (:mod:`geozoom_ros.eval.metrics`) and replays odometry, IMU and fixes through the EKF of
   :mod:`geozoom_ros.eval.fusion`.

A missing ground-truth topic is a warning (the metrics that need it are skipped); a missing
image topic, an empty bag or one that cannot be read (truncated, corrupt) is an
:class:`~geozoom_ros.errors.InputError` with one line. Positions are compared in the local
East-North-Up frame (metres) about the datum: the drive's frame when the bag carries one
(bags written by ``geozoom world``), else the first ground-truth fix, else the map's centre.
Times are seconds since the bag's first message. No torch or rclpy at module level.
"""

from dataclasses import dataclass, field
import math
from pathlib import Path
import sys
import time

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.eval import fusion as F
from geozoom_ros.eval import metrics
from geozoom_ros.ros.gating import (compass_heading_deg, Gate, PriorMonitor, safe_covariance_en,
                                    yaw_from_quaternion)

DEFAULT_GT_TOPIC = '/gps/fix_truth'
DEFAULT_ODOM_TOPIC = '/odom'
DEFAULT_IMU_TOPIC = '/imu/data'
DEFAULT_IMAGE_TOPICS = ('/camera/image_raw', '/camera/image_raw/compressed')
IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
#: Ground truth is interpolated only between samples at most this far apart (seconds): a
#: longer gap (a GPS outage) leaves the frames in it without truth.
MAX_GT_GAP_S = 2.0
#: A frame this close (seconds) before the first or after the last truth sample takes it.
GT_EDGE_S = 0.05
#: Variance assumed for a twist component whose covariance the odometry leaves at zero.
DEFAULT_TWIST_VAR = 0.01


def _warn(msg, sink=None):
    if sink is not None:
        sink.append(msg)
    print(f'geozoom eval-bag: warning: {msg}', file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Stamps

@dataclass
class StampReport:
    """What sorting a series by stamp found: messages out of order and duplicate stamps."""

    messages: int = 0
    out_of_order: int = 0
    duplicates: int = 0

    def to_json(self):
        """Return the counts as a dict."""
        return {'messages': self.messages, 'out_of_order': self.out_of_order,
                'duplicates': self.duplicates}


def clean_stamps(stamps_ns, *columns):
    """Sort a series by stamp and drop repeated stamps (the first message of a stamp stays).

    ``stamps_ns`` are integer nanoseconds in arrival order; each column is an array of the
    same length. Returns ``(order, report)``: the indices (into the arrival order) to keep, in
    stamp order, and a :class:`StampReport`. A message is out of order when its stamp is
    older than an earlier message's.
    """
    s = np.asarray(stamps_ns, dtype=np.int64)
    for c in columns:
        if len(c) != len(s):
            raise ValueError('columns must have one value per stamp')
    rep = StampReport(messages=int(len(s)))
    if len(s) == 0:
        return np.zeros(0, dtype=np.int64), rep
    running_max = np.maximum.accumulate(s)
    rep.out_of_order = int(np.sum(s[1:] < running_max[:-1]))
    order = np.argsort(s, kind='stable')
    keep = np.ones(len(order), bool)
    keep[1:] = s[order][1:] != s[order][:-1]
    rep.duplicates = int(np.sum(~keep))
    return order[keep], rep


def interpolate_track(t, values, t_query, max_gap_s=MAX_GT_GAP_S, edge_s=GT_EDGE_S):
    """Interpolate a sorted series at query times; NaN where it does not cover them.

    ``t`` (N,) increasing seconds, ``values`` (N, C). A query between two samples at most
    ``max_gap_s`` apart gets the linear interpolation; one within ``edge_s`` outside the ends
    takes the end sample; anything else (a gap, outside the series) gets NaN.
    """
    t = np.asarray(t, dtype=float)
    v = np.asarray(values, dtype=float).reshape(len(t), -1)
    q = np.atleast_1d(np.asarray(t_query, dtype=float))
    out = np.full((len(q), v.shape[1]), np.nan)
    if len(t) == 0:
        return out
    i = np.searchsorted(t, q, side='right')
    for k, (qq, ii) in enumerate(zip(q, i)):
        if ii == 0:
            if t[0] - qq <= edge_s:
                out[k] = v[0]
        elif ii == len(t):
            if qq == t[-1] or qq - t[-1] <= edge_s:
                out[k] = v[-1]
        else:
            t0, t1 = t[ii - 1], t[ii]
            if qq == t0:
                out[k] = v[ii - 1]
            elif t1 - t0 <= max_gap_s:
                w = (qq - t0) / (t1 - t0)
                out[k] = (1.0 - w) * v[ii - 1] + w * v[ii]
    return out


def _stamp_ns(msg, bag_ns):
    h = getattr(msg, 'header', None)
    if h is not None:
        ns = int(h.stamp.sec) * 1_000_000_000 + int(h.stamp.nanosec)
        if ns > 0:
            return ns
    return int(bag_ns)


def _yaw_or_nan(q):
    """Return the ENU yaw (radians) of a quaternion message, NaN where it gives none."""
    try:
        return yaw_from_quaternion(q.x, q.y, q.z, q.w)
    except InputError:
        return float('nan')


# --------------------------------------------------------------------------------------------
# Reading

@dataclass
class GeoTrack:
    """Ground-truth positions: ``t`` (N,) s, ``lat``/``lon`` degrees, ``enu`` (N, 2) m."""

    topic: str
    t: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    enu: np.ndarray
    stamps: StampReport
    dropped: int = 0

    def __len__(self):
        return len(self.t)

    def at(self, t_query):
        """Return ``(lat, lon, enu (Q, 2))`` at query times (NaN where not covered)."""
        v = interpolate_track(self.t, np.column_stack([self.enu, self.lat, self.lon]), t_query)
        return v[:, 2], v[:, 3], v[:, :2]


@dataclass
class ImageFrame:
    """One camera message: its number in the bag, stamp, and the RGB pixels or why not."""

    index: int
    stamp_ns: int
    t: float
    rgb: np.ndarray = None
    error: str = None


class BagData:
    """A drive bag opened for evaluation (see :func:`read_bag`).

    Attributes:
        path: the bag folder; topics: topic -> message type; counts: topic -> messages.
        t0_ns: the bag's first message time (ns); times are seconds since it.
        image_topic, image_type, n_images: the camera topic, its type and message count.
        gt: :class:`GeoTrack` or None; odom: :class:`~geozoom_ros.eval.fusion.OdometrySeries`
            or None; imu: :class:`~geozoom_ros.eval.fusion.ImuSeries` or None.
        frame: the :class:`~geozoom_ros.geo.LocalFrame` of the datum (None until known).
        metadata: the drive description of bags written by ``geozoom world`` ({} otherwise).
        stamps: topic -> :class:`StampReport`; warnings: the warnings given while reading.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.topics, self.counts = {}, {}
        self.t0_ns = 0
        self.image_topic = self.image_type = None
        self.n_images = 0
        self.gt = self.odom = self.imu = None
        self.gt_topic = self.odom_topic = self.imu_topic = None
        self.frame = None
        self.metadata = {}
        self.stamps = {}
        self.warnings = []

    def seconds(self, stamp_ns):
        """Return seconds since the bag's first message of integer nanoseconds."""
        return (np.asarray(stamp_ns, dtype=np.int64) - self.t0_ns) * 1e-9

    def set_frame(self, frame):
        """Set the datum's LocalFrame and compute the ground truth's ENU positions."""
        self.frame = frame
        if self.gt is not None and len(self.gt):
            e, n, _ = frame.to_enu(self.gt.lat, self.gt.lon, np.zeros(len(self.gt)))
            self.gt.enu = np.column_stack([np.atleast_1d(e), np.atleast_1d(n)])

    def images(self, every=1, limit=None):
        """Yield an :class:`ImageFrame` for every ``every``-th camera message, in bag order.

        A frame that cannot be decoded comes with ``error`` set (and no pixels). A bag that
        fails while being read raises InputError.
        """
        from geozoom_ros.ros.conversions import msg_to_rgb

        every = max(1, int(every))
        done = 0
        with _open_reader(self.path) as reader:
            conns = [c for c in reader.connections if c.topic == self.image_topic]
            it = reader.messages(connections=conns)
            index = -1
            while True:
                try:
                    conn, bag_ns, raw = next(it)
                except StopIteration:
                    return
                except Exception as exc:  # noqa: B902 - rosbags raises many types
                    raise InputError(f'bag {self.path} failed while reading '
                                     f'{self.image_topic} after {index + 1} frames '
                                     f'({_one_line(exc)}); the file is truncated or corrupt'
                                     ) from None
                index += 1
                if index % every:
                    continue
                if limit is not None and done >= limit:
                    return
                done += 1
                try:
                    msg = reader.deserialize(raw, conn.msgtype)
                except Exception as exc:  # noqa: B902
                    yield ImageFrame(index, int(bag_ns), float(self.seconds(bag_ns)),
                                     error=f'undecodable message ({_one_line(exc)})')
                    continue
                ns = _stamp_ns(msg, bag_ns)
                try:
                    rgb = msg_to_rgb(msg)
                    yield ImageFrame(index, ns, float(self.seconds(ns)), rgb=rgb)
                except InputError as exc:
                    yield ImageFrame(index, ns, float(self.seconds(ns)), error=str(exc))

    def summary(self):
        """Return a JSON-ready description of what the bag holds."""
        return {'path': str(self.path), 'topics': dict(sorted(self.counts.items())),
                'image_topic': self.image_topic, 'image_type': self.image_type,
                'images': self.n_images, 'gt_topic': self.gt_topic,
                'ground_truth': self.gt is not None, 'odom_topic': self.odom_topic,
                'odometry': self.odom is not None, 'imu_topic': self.imu_topic,
                'imu': self.imu is not None,
                'stamps': {k: v.to_json() for k, v in self.stamps.items()},
                'datum': None if self.frame is None else
                {'lat': self.frame.lat0, 'lon': self.frame.lon0}}


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


class _open_reader:
    """Context manager: a rosbags AnyReader, with one-line InputErrors for unreadable bags."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import get_typestore, Stores

        if not self.path.exists():
            raise InputError(f'bag {self.path} does not exist; pass a rosbag2 folder (holding '
                             'metadata.yaml and a .mcap or .db3 file)')
        if self.path.is_dir() and not (self.path / 'metadata.yaml').exists():
            raise InputError(f'bag {self.path} has no metadata.yaml; pass a rosbag2 folder '
                             '(ros2 bag reindex can rebuild a lost metadata.yaml)')
        try:
            # Old sqlite3 bags carry no message definitions: fall back to a ROS 2 typestore.
            self.reader = AnyReader([self.path],
                                    default_typestore=get_typestore(Stores.ROS2_HUMBLE))
            self.reader.open()
        except Exception as exc:  # noqa: B902 - rosbags raises several unrelated types
            raise InputError(f'bag {self.path} cannot be read ({_one_line(exc)}); it is '
                             'truncated or corrupt: recover it with `mcap recover` (MCAP) or '
                             '`ros2 bag reindex` (sqlite3), or re-record it') from None
        return self.reader

    def __exit__(self, *exc):
        self.reader.close()
        return False


def _resolve_path(path):
    p = Path(path)
    if p.is_file() and p.suffix in ('.mcap', '.db3') and (p.parent / 'metadata.yaml').exists():
        return p.parent
    return p


def _pick_image_topic(path, topics, counts, image_topic):
    images = sorted(t for t, m in topics.items() if m in IMAGE_TYPES)
    if image_topic:
        if image_topic not in topics:
            have = ', '.join(images) if images else 'none'
            raise InputError(f'bag {path} has no topic {image_topic!r} (image topics: {have}); '
                             'pass --image-topic')
        if topics[image_topic] not in IMAGE_TYPES:
            raise InputError(f'topic {image_topic} of bag {path} is {topics[image_topic]}, not '
                             'sensor_msgs/Image or CompressedImage; pass --image-topic')
        return image_topic
    if not images:
        listed = ', '.join(sorted(topics)) or 'none'
        raise InputError(f'bag {path} holds no sensor_msgs/Image or CompressedImage topic '
                         f'(topics: {listed}); record the camera or pass --image-topic')
    for cand in DEFAULT_IMAGE_TOPICS:
        if cand in topics and counts.get(cand, 0) > 0:
            return cand
    return max(images, key=lambda t: counts.get(t, 0))


def read_bag(path, image_topic=None, gt_topic=DEFAULT_GT_TOPIC, odom_topic=DEFAULT_ODOM_TOPIC,
             imu_topic=DEFAULT_IMU_TOPIC, quiet=False):
    """Open a drive bag; return :class:`BagData` with truth, odometry and IMU read in full.

    ``image_topic`` None picks ``/camera/image_raw`` (or its ``/compressed``), else the image
    topic with the most messages. ``gt_topic``, ``odom_topic``, ``imu_topic``: ``''`` or None
    leaves the input out; a missing one is a warning. Raises InputError (one line) for a bag
    that does not exist or cannot be read, and for a missing or empty image topic.
    """
    from geozoom_ros.geo import LocalFrame
    from geozoom_ros.world.drive import read_drive_metadata

    path = _resolve_path(path)
    bag = BagData(path)
    warn = (lambda m: bag.warnings.append(m)) if quiet else \
        (lambda m: _warn(m, bag.warnings))
    with _open_reader(path) as reader:
        bag.topics = {c.topic: c.msgtype for c in reader.connections}
        for c in reader.connections:
            bag.counts[c.topic] = bag.counts.get(c.topic, 0) + int(c.msgcount)
        bag.t0_ns = int(reader.start_time) if bag.counts and sum(bag.counts.values()) else 0
        bag.image_topic = _pick_image_topic(path, bag.topics, bag.counts, image_topic)
        bag.image_type = bag.topics[bag.image_topic]
        bag.n_images = bag.counts.get(bag.image_topic, 0)
        if bag.n_images == 0:
            raise InputError(f'bag {path} holds no messages on {bag.image_topic} (an empty '
                             'recording?); check the bag with geozoom eval-bag --image-topic '
                             'or re-record it')

        wanted = {}
        for role, topic, msgtype in (('gt', gt_topic, 'sensor_msgs/msg/NavSatFix'),
                                     ('odom', odom_topic, 'nav_msgs/msg/Odometry'),
                                     ('imu', imu_topic, 'sensor_msgs/msg/Imu')):
            if not topic:
                continue
            what = {'gt': 'ground-truth', 'odom': 'odometry', 'imu': 'IMU'}[role]
            if topic not in bag.topics:
                tail = {'gt': 'metrics that need ground truth are skipped; pass --gt-topic',
                        'odom': 'the fusion replay is skipped; pass --odom-topic',
                        'imu': 'the EKF runs without it'}[role]
                warn(f'bag {path} has no {what} topic {topic}: {tail}')
                continue
            if bag.topics[topic] != msgtype:
                warn(f'{what} topic {topic} of bag {path} is {bag.topics[topic]}, not '
                     f'{msgtype}: ignored')
                continue
            wanted[topic] = role
        raw = {role: [] for role in wanted.values()}
        conns = [c for c in reader.connections if c.topic in wanted]
        try:
            for conn, bag_ns, data in reader.messages(connections=conns):
                msg = reader.deserialize(data, conn.msgtype)
                raw[wanted[conn.topic]].append((_stamp_ns(msg, bag_ns), msg))
        except Exception as exc:  # noqa: B902 - rosbags raises many types
            raise InputError(f'bag {path} failed while reading {", ".join(sorted(wanted))} '
                             f'({_one_line(exc)}); the file is truncated or corrupt') from None

    for topic, role in wanted.items():
        items = raw[role]
        if role == 'gt':
            bag.gt_topic = topic
            bag.gt = _read_gt(bag, topic, items, warn)
        elif role == 'odom':
            bag.odom_topic = topic
            bag.odom = _read_odom(bag, topic, items, warn)
        else:
            bag.imu_topic = topic
            bag.imu = _read_imu(bag, topic, items, warn)
    try:
        bag.metadata = read_drive_metadata(path) if path.is_dir() else {}
    except InputError:
        bag.metadata = {}
    fr = bag.metadata.get('frame')
    if fr:
        bag.set_frame(LocalFrame(fr['lat0'], fr['lon0'], fr.get('h0', 0.0)))
    elif bag.gt is not None:
        bag.set_frame(LocalFrame(float(bag.gt.lat[0]), float(bag.gt.lon[0])))
    return bag


def _sorted(bag, topic, items, warn):
    order, rep = clean_stamps([ns for ns, _ in items])
    bag.stamps[topic] = rep
    if rep.out_of_order or rep.duplicates:
        warn(f'{topic}: {rep.out_of_order} messages out of stamp order (sorted) and '
             f'{rep.duplicates} duplicate stamps (first kept)')
    return [items[i] for i in order]


def _read_gt(bag, topic, items, warn):
    items = _sorted(bag, topic, items, warn)
    rows, dropped = [], 0
    for ns, m in items:
        lat, lon = float(m.latitude), float(m.longitude)
        # STATUS_NO_FIX (-1) carries no position.
        if int(m.status.status) < 0 or not (math.isfinite(lat) and math.isfinite(lon)) or \
                not (-90 <= lat <= 90 and -180 <= lon <= 180):
            dropped += 1
            continue
        rows.append((ns, lat, lon))
    if not rows:
        warn(f'ground-truth topic {topic} holds no valid fix: metrics that need ground truth '
             'are skipped')
        return None
    a = np.array(rows, dtype=object)
    ns = a[:, 0].astype(np.int64)
    return GeoTrack(topic, bag.seconds(ns), a[:, 1].astype(float), a[:, 2].astype(float),
                    np.full((len(rows), 2), np.nan), bag.stamps[topic], dropped)


def _var(value, default):
    v = float(value)
    return v if math.isfinite(v) and v > 0 else default


def _read_odom(bag, topic, items, warn):
    items = _sorted(bag, topic, items, warn)
    if not items:
        warn(f'odometry topic {topic} holds no messages: the fusion replay is skipped')
        return None
    n = len(items)
    t = bag.seconds([ns for ns, _ in items])
    cols = np.zeros((n, 6))
    var = np.zeros((n, 3))
    zero_cov = 0
    for k, (_, m) in enumerate(items):
        p, q = m.pose.pose.position, m.pose.pose.orientation
        tw = m.twist.twist
        cols[k] = (p.x, p.y, _yaw_or_nan(q), tw.linear.x, tw.linear.y,
                   tw.angular.z)
        c = np.asarray(m.twist.covariance, dtype=float).reshape(-1)
        if c.size != 36 or not np.any(c[[0, 7, 35]] > 0):
            zero_cov += 1
            c = np.zeros(36)
        var[k] = (_var(c[0], DEFAULT_TWIST_VAR), _var(c[7], DEFAULT_TWIST_VAR),
                  _var(c[35], DEFAULT_TWIST_VAR))
    if zero_cov:
        warn(f'{topic}: {zero_cov} messages carry no twist covariance; assumed '
             f'{DEFAULT_TWIST_VAR} (m/s)^2 and (rad/s)^2')
    ok = np.all(np.isfinite(cols), axis=1)
    if not ok.all():
        warn(f'{topic}: {int((~ok).sum())} messages with non-finite pose or twist dropped')
    if not ok.any():
        return None
    return F.OdometrySeries(t[ok], *(cols[ok, i] for i in range(6)), var[ok])


def _read_imu(bag, topic, items, warn):
    items = _sorted(bag, topic, items, warn)
    if not items:
        return None
    n = len(items)
    t = bag.seconds([ns for ns, _ in items])
    yaw, yaw_var, wz, wz_var = (np.full(n, np.nan) for _ in range(4))
    for k, (_, m) in enumerate(items):
        oc = np.asarray(m.orientation_covariance, dtype=float).reshape(-1)
        if oc.size == 9 and oc[0] != -1.0:  # -1: the IMU gives no orientation
            q = m.orientation
            yaw[k] = _yaw_or_nan(q)
            yaw_var[k] = _var(oc[8], 1e-2)
        wc = np.asarray(m.angular_velocity_covariance, dtype=float).reshape(-1)
        if wc.size == 9 and wc[0] != -1.0:
            wz[k] = float(m.angular_velocity.z)
            wz_var[k] = _var(wc[8], 1e-4)
    return F.ImuSeries(t, yaw, yaw_var, wz, wz_var)


# --------------------------------------------------------------------------------------------
# Localising the frames

@dataclass
class FrameFix:
    """The localizer's answer for one camera frame.

    ``status``: 'fix', 'no_cell' (the search reached no cell) or 'bad_image'. ``lat``/``lon``
    degrees, ``cov_en`` 2x2 m^2 (floored as published), ``sigma_m`` its 1-sigma radius,
    ``confidence`` 0..1, ``gated_in`` whether the node would publish it as a FIX,
    ``latency_ms`` decode + encoder + search wall time, ``prior`` whether the search was
    restricted by a prior.
    """

    index: int
    stamp_ns: int
    t: float
    status: str
    lat: float = float('nan')
    lon: float = float('nan')
    cov_en: np.ndarray = field(default_factory=lambda: np.full((2, 2), np.nan))
    sigma_m: float = float('nan')
    confidence: float = float('nan')
    gated_in: bool = False
    latency_ms: float = float('nan')
    prior: bool = False
    note: str = ''


def frame_fix_from_navsatfix(msg, bag, index=-1, latency_ms=float('nan'), confidence=None):
    """Return the :class:`FrameFix` of a ``sensor_msgs/NavSatFix`` the node published.

    Works with rclpy and rosbags messages alike. The stamp is the header's (the camera
    frame's); status FIX (>= 0) means the node's gate let it through; the covariance is the
    east/north block of ``position_covariance`` (m^2). NavSatFix carries no confidence:
    ``confidence`` None leaves it NaN. Lets :func:`evaluate` score the fixes of a live run.
    """
    ns = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    lat, lon = float(msg.latitude), float(msg.longitude)
    cov = np.asarray(msg.position_covariance, dtype=float).reshape(3, 3)[:2, :2]
    ok = math.isfinite(lat) and math.isfinite(lon) and np.all(np.isfinite(cov))
    if not ok:
        return FrameFix(index, ns, float(bag.seconds(ns)), 'no_cell', latency_ms=latency_ms)
    cov = safe_covariance_en(cov)
    return FrameFix(index, ns, float(bag.seconds(ns)), 'fix', lat, lon, cov,
                    math.sqrt(0.5 * float(np.trace(cov))),
                    float('nan') if confidence is None else float(confidence),
                    int(msg.status.status) >= 0, latency_ms)


def start_pose(bag, t_start):
    """Return ``(Pose2D in the map frame, transform map<-odom, how)`` at ``t_start``.

    The true initial pose: the drive's recorded odom-frame origin when the bag carries it,
    else the ground truth's position with the direction of travel over its first metres.
    Without ground truth: None.
    """
    odom = bag.odom
    o0 = (float(np.interp(t_start, odom.t, odom.x)), float(np.interp(t_start, odom.t, odom.y)),
          float(odom.yaw[int(np.searchsorted(odom.t, t_start).clip(0, len(odom) - 1))]))
    rec = bag.metadata.get('odom_start_enu')
    if rec is not None and bag.metadata.get('frame'):
        tf = (float(rec[0]), float(rec[1]), float(rec[2]))
        c, s = math.cos(tf[2]), math.sin(tf[2])
        pose = F.Pose2D(t_start, tf[0] + c * o0[0] - s * o0[1], tf[1] + s * o0[0] + c * o0[1],
                        float(F.wrap_angle(tf[2] + o0[2])))
        return pose, tf, 'the drive record of the odom origin'
    gt = bag.gt
    if gt is None or not len(gt):
        return None, None, 'no ground truth'
    _, _, enu = gt.at([t_start])
    if not np.all(np.isfinite(enu)):
        i = int(np.argmin(np.abs(gt.t - t_start)))
        enu = gt.enu[i:i + 1]
    p0 = enu[0]
    after = gt.enu[gt.t >= t_start]
    far = np.nonzero(np.linalg.norm(after - p0, axis=1) >= 3.0)[0]
    if len(far):
        d = after[far[0]] - p0
        yaw = math.atan2(d[1], d[0])
        how = 'the ground truth (position, direction of travel)'
    elif bag.imu is not None and np.isfinite(bag.imu.yaw).any():
        ok = np.isfinite(bag.imu.yaw)
        yaw = float(bag.imu.yaw[ok][0])
        how = 'the ground truth (position) and the IMU (yaw)'
    else:
        yaw = 0.0
        how = 'the ground truth (position; yaw unknown, 0)'
    pose = F.Pose2D(t_start, float(p0[0]), float(p0[1]), yaw)
    tf = F.odom_to_map_transform(o0, (pose.x, pose.y, pose.yaw))
    return pose, tf, how


def _heading_at(bag, t):
    imu = bag.imu
    if imu is None or not np.isfinite(imu.yaw).any():
        return None
    ok = np.isfinite(imu.yaw)
    i = int(np.argmin(np.abs(imu.t[ok] - t)))
    if abs(imu.t[ok][i] - t) > 0.5:
        return None
    return compass_heading_deg(imu.yaw[ok][i])


def localize_frames(bag, localizer, every=1, gate=None, prior='none', fusion_config=None,
                    limit=None, progress=True):
    """Localise every ``every``-th frame of ``bag``; return a list of :class:`FrameFix`.

    ``prior``: 'none' (whole-map search) or 'fused' (the EKF's estimate from odometry, IMU and
    the fixes so far restricts the search, floored at the gate's ``prior_min_sigma_m``; after
    ``prior_disagree_count`` fixes in a row that disagree the search falls back to the whole
    map, as the node does). A model that takes the camera heading gets it from the IMU.
    """
    from tqdm import tqdm

    from geozoom_ros.search import Prior

    gate = (gate or Gate()).use_calibration(localizer.calibration)
    if prior not in ('none', 'fused'):
        raise InputError(f'--prior {prior!r} is unknown; use none or fused')
    online = monitor = None
    if prior == 'fused':
        if bag.odom is None:
            raise InputError(f'--prior fused needs odometry; bag {bag.path} has none on '
                             f'{bag.odom_topic or DEFAULT_ODOM_TOPIC}')
        if bag.frame is None:
            raise InputError('--prior fused needs the start pose: the bag has no ground truth')
        fusion_config = fusion_config or F.load_ekf_config()
        start, _, _ = start_pose(bag, float(bag.odom.t[0]))
        if start is None:
            raise InputError('--prior fused needs the true start pose; the bag has no ground '
                             'truth')
        online = F.OnlineFusion(fusion_config, bag.odom, start, bag.imu,
                                position_sigma_m=fusion_config.init_position_sigma_m)
        monitor = PriorMonitor(gate.prior_disagree_count)
    # A model that takes the heading needs one; the fused search uses it when there is one.
    needs_heading = bool(getattr(localizer, 'heading_input', False))
    wants_heading = needs_heading or bool(getattr(localizer, 'uses_heading', False))
    total = (bag.n_images + every - 1) // every
    if limit:
        total = min(total, limit)
    out = []
    bar = tqdm(total=total, desc='localising frames', unit='frame', disable=not progress)
    for fr in bag.images(every=every, limit=limit):
        bar.update(1)
        t0 = time.perf_counter()
        if fr.error:
            out.append(FrameFix(fr.index, fr.stamp_ns, fr.t, 'bad_image', note=fr.error))
            continue
        search_prior = None
        if online is not None:
            online.advance(fr.t)
            if not monitor.whole_map:
                x = online.ekf.state
                lat, lon, _ = bag.frame.to_latlon(x[0], x[1], 0.0)
                cov = online.ekf.position_cov
                vals, vecs = np.linalg.eigh(0.5 * (cov + cov.T))
                cov = (vecs * np.maximum(vals, gate.prior_min_sigma_m ** 2)) @ vecs.T
                search_prior = Prior(float(lat), float(lon), cov)
        heading = _heading_at(bag, fr.t) if wants_heading else None
        if needs_heading and heading is None:
            out.append(FrameFix(fr.index, fr.stamp_ns, fr.t, 'no_cell',
                                note='the model takes a heading and the bag has no IMU yaw'))
            continue
        try:
            fix = localizer.localize(fr.rgb, heading_deg=heading, prior=search_prior)
        except InputError as exc:
            out.append(FrameFix(fr.index, fr.stamp_ns, fr.t, 'bad_image', note=str(exc)))
            continue
        latency = (time.perf_counter() - t0) * 1e3
        if fix is None:
            out.append(FrameFix(fr.index, fr.stamp_ns, fr.t, 'no_cell', latency_ms=latency,
                                prior=search_prior is not None))
            if monitor is not None and search_prior is not None:
                monitor.observe(False)
            continue
        gated_in, sigma, cov = gate.passes(fix.confidence, fix.cov_en, fix.method)
        rec = FrameFix(fr.index, fr.stamp_ns, fr.t, 'fix', float(fix.lat), float(fix.lon), cov,
                       sigma, float(fix.confidence), gated_in, latency,
                       prior=search_prior is not None)
        out.append(rec)
        if online is not None:
            if search_prior is not None:
                monitor.observe(gated_in and gate.agrees_with(search_prior, rec.lat, rec.lon))
            elif gated_in:
                monitor.observe(True)
            if gated_in:
                e, n, _ = bag.frame.to_enu(rec.lat, rec.lon, 0.0)
                online.add_fix(fr.t, (float(e), float(n)), cov)
    bar.close()
    return out


# --------------------------------------------------------------------------------------------
# Scoring

@dataclass
class BagEvaluation:
    """Everything the report shows: per-frame fixes and truth, trajectories, metrics.

    ``frames``: :class:`FrameFix` sorted by stamp (duplicate stamps dropped);
    ``true_lat``/``true_lon``/``true_enu``/``error_m`` per frame (NaN without truth; a frame
    without a fix has an infinite error); ``fix_enu`` (N, 2) m; ``ekf_accepted`` per frame
    (None without fusion); trajectories in the map frame: ``fused``, ``dead_reckoning``
    (:class:`~geozoom_ros.eval.fusion.FusionTrack`), ``odom_only`` ((t, xy)); ``truth``
    (t, xy); ``metrics`` the JSON summary.
    """

    bag: BagData
    frames: list
    true_lat: np.ndarray
    true_lon: np.ndarray
    true_enu: np.ndarray
    error_m: np.ndarray
    fix_enu: np.ndarray
    gate: Gate
    metrics: dict
    ekf_accepted: np.ndarray = None
    ekf_tested: np.ndarray = None
    fused: object = None
    dead_reckoning: object = None
    odom_only: tuple = None
    truth: tuple = None
    errors: dict = field(default_factory=dict)
    map_path: str = None
    warnings: list = field(default_factory=list)


def _arr(frames, name):
    return np.array([getattr(f, name) for f in frames], dtype=float)


def evaluate(bag, frames, gate=None, fusion_config=None, info=None, quiet=False):
    """Score the fixes of a bag's frames and replay the fusion; return :class:`BagEvaluation`.

    ``frames``: :class:`FrameFix` records (any order; e.g. from :func:`localize_frames` or
    built from the fixes a node published). ``fusion_config``: a
    :class:`~geozoom_ros.eval.fusion.FusionConfig` (default: ``config/ekf.yaml``'s ekf_map);
    the replay runs when the bag has odometry, and its errors are measured when it has ground
    truth. ``info``: extra JSON fields for ``metrics.json`` (model, bundle, options).
    """
    gate = gate or Gate()
    warnings = list(bag.warnings)

    def warn(msg):
        if not quiet:
            _warn(msg)
        warnings.append(msg)

    order, rep = clean_stamps([f.stamp_ns for f in frames])
    frames = [frames[i] for i in order]
    n = len(frames)
    if bag.frame is None:
        raise InputError('evaluate() needs the datum: call bag.set_frame(LocalFrame(...)) for '
                         'a bag without ground truth')
    t = _arr(frames, 't')
    lat, lon = _arr(frames, 'lat'), _arr(frames, 'lon')
    fix_enu = np.full((n, 2), np.nan)
    has = np.isfinite(lat) & np.isfinite(lon)
    if has.any():
        e, nn, _ = bag.frame.to_enu(lat[has], lon[has], np.zeros(int(has.sum())))
        fix_enu[has] = np.column_stack([np.atleast_1d(e), np.atleast_1d(nn)])
    gated = np.array([f.gated_in for f in frames], dtype=bool)
    conf = _arr(frames, 'confidence')
    lat_ms = _arr(frames, 'latency_ms')
    status = [f.status for f in frames]

    m = {'bag': bag.summary(), 'frames': {
        'evaluated': n, 'fixes': int(sum(s == 'fix' for s in status)),
        'no_cell': int(sum(s == 'no_cell' for s in status)),
        'bad_images': int(sum(s == 'bad_image' for s in status)),
        'published': int(gated.sum()), 'stamps': rep.to_json()},
        'gate': gate.to_json()}
    if rep.out_of_order or rep.duplicates:
        warn(f'camera frames: {rep.out_of_order} out of stamp order (sorted), '
             f'{rep.duplicates} duplicate stamps (first kept)')
    m.update(info or {})
    finite_lat = lat_ms[np.isfinite(lat_ms)]
    m['latency_ms'] = metrics.json_ready({
        'p50': np.percentile(finite_lat, 50) if finite_lat.size else None,
        'p95': np.percentile(finite_lat, 95) if finite_lat.size else None,
        'mean': finite_lat.mean() if finite_lat.size else None,
        'max': finite_lat.max() if finite_lat.size else None})

    true_lat = true_lon = np.full(n, np.nan)
    true_enu = np.full((n, 2), np.nan)
    err = np.full(n, np.nan)
    if bag.gt is not None:
        true_lat, true_lon, true_enu = bag.gt.at(t)
        known = np.isfinite(true_lat)
        err = np.full(n, np.nan)
        err[known] = metrics.error_m(lat[known], lon[known], true_lat[known], true_lon[known])
        m['ground_truth'] = {'topic': bag.gt_topic, 'frames_with_truth': int(known.sum()),
                             'frames_without_truth': int((~known).sum())}
        if (~known).any():
            warn(f'{int((~known).sum())} of {n} frames have no ground truth within '
                 f'{MAX_GT_GAP_S} s: left out of the fix metrics')
        cov = np.array([f.cov_en for f in frames]).reshape(n, 2, 2)
        en = metrics.error_en(lat[known], lon[known], true_lat[known], true_lon[known])
        nees = metrics.nees(en, cov[known])
        fm = metrics.summarize(err[known], nees_values=nees, latencies_ms=lat_ms[known],
                               confidence=conf[known])
        for key in ('step_accuracy', 'chance'):
            fm.pop(key, None)
        m['fixes'] = fm
        pub = known & gated
        m['published_fixes'] = metrics.json_ready({
            'n': int(pub.sum()),
            'fraction_of_frames': float(pub.sum() / known.sum()) if known.any() else None,
            **{f'recall@{d:g}m': metrics.recall_at(err[pub], d) if pub.any() else None
               for d in metrics.RECALL_DISTANCES_M},
            'median_error_m': metrics.percentile(err[pub], 50) if pub.any() else None,
            'p90_error_m': metrics.percentile(err[pub], 90) if pub.any() else None})
    else:
        m['ground_truth'] = None
        m['fixes'] = None

    ev = BagEvaluation(bag, frames, true_lat, true_lon, true_enu, err, fix_enu, gate, m,
                       warnings=warnings)
    if bag.gt is not None:
        ev.truth = (bag.gt.t, bag.gt.enu)
    _fusion(ev, fusion_config, warn)
    ev.metrics = metrics.json_ready(ev.metrics)
    ev.metrics['warnings'] = list(warnings)
    return ev


def _fusion(ev, config, warn):
    bag = ev.bag
    m = ev.metrics
    if bag.odom is None or len(bag.odom) < 2:
        m['fusion'] = None
        return
    config = config or F.load_ekf_config()
    t_start = float(bag.odom.t[0])
    start, tf, how = start_pose(bag, t_start)
    position_sigma = config.init_position_sigma_m
    if start is None:
        # No truth: start from the first published fix, ekf.yaml's initial covariance.
        first = [i for i, f in enumerate(ev.frames) if f.gated_in]
        if not first:
            warn('the fusion replay is skipped: no ground truth for the start pose and no '
                 'published fix')
            m['fusion'] = None
            return
        i = first[0]
        yaw = 0.0
        if bag.imu is not None and np.isfinite(bag.imu.yaw).any():
            yaw = float(bag.imu.yaw[np.isfinite(bag.imu.yaw)][0])
        start = F.Pose2D(t_start, *ev.fix_enu[i], yaw)
        tf = F.odom_to_map_transform((bag.odom.x[0], bag.odom.y[0], bag.odom.yaw[0]),
                                     (start.x, start.y, start.yaw))
        how = 'the first published fix (no ground truth)'
        position_sigma = None
    use = np.array([f.gated_in for f in ev.frames], dtype=bool) & \
        np.all(np.isfinite(ev.fix_enu), axis=1)
    idx = np.nonzero(use)[0]
    fixes = F.FixInput(np.array([ev.frames[i].t for i in idx], dtype=float),
                       ev.fix_enu[idx], np.array([ev.frames[i].cov_en for i in idx]).reshape(
                           len(idx), 2, 2))
    imu = bag.imu if (config.imu_topic and bag.imu is not None) else None
    ev.fused = F.fuse(config, bag.odom, start, fixes, imu, position_sigma_m=position_sigma)
    ev.dead_reckoning = F.fuse(config, bag.odom, start, None, imu,
                               position_sigma_m=position_sigma)
    ev.odom_only = (bag.odom.t, F.align_odometry(bag.odom, tf))
    ev.ekf_accepted = np.zeros(len(ev.frames), bool)
    ev.ekf_tested = np.zeros(len(ev.frames), bool)
    ev.ekf_accepted[idx] = ev.fused.fix_accepted
    ev.ekf_tested[idx] = np.isfinite(ev.fused.fix_d2)
    fm = {'config': config.to_json(), 'start_pose_from': how,
          'imu_fused': imu is not None,
          'fixes_offered': int(len(idx)), 'fixes_fused': ev.fused.accepted,
          'fixes_rejected_by_gate': ev.fused.rejected,
          'fixes_before_start': int(len(idx) - np.isfinite(ev.fused.fix_d2).sum())}
    if ev.truth is not None:
        t_gt, xy_gt = ev.truth
        for name, (tt, xy) in (('fused', (ev.fused.t, ev.fused.xy)),
                               ('ekf_without_fixes', (ev.dead_reckoning.t,
                                                      ev.dead_reckoning.xy)),
                               ('odometry_only', ev.odom_only)):
            ev.errors[name] = F.trajectory_errors(tt, xy, t_gt, xy_gt)
            fm[name] = ev.errors[name].to_json()
        f_fin = ev.errors['fused'].final_error_m
        o_fin = ev.errors['odometry_only'].final_error_m
        fm['final_error_ratio_odometry_over_fused'] = o_fin / f_fin if f_fin > 0 else None
        fm['ate_ratio_odometry_over_fused'] = (ev.errors['odometry_only'].ate_rmse_m /
                                               ev.errors['fused'].ate_rmse_m) \
            if ev.errors['fused'].ate_rmse_m > 0 else None
    m['fusion'] = fm


def map_path_of_bundle(bundle_path):
    """Return the tile pyramid a bundle was built from when it still exists, else None."""
    import json

    try:
        man = json.loads((Path(bundle_path) / 'manifest.json').read_text())
        p = Path(man['map']['path'])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return p if p.exists() else None


def evaluate_bag(bag_path, bundle, model, *, image_topic=None, gt_topic=DEFAULT_GT_TOPIC,
                 odom_topic=None, imu_topic=None, every=1, limit=None, backend='auto',
                 beam_width=8, method='zoom-beam', prior='none', gate=None,
                 ekf_config=None, progress=True, localizer=None):
    """Read a bag, localise its frames, score them and replay the fusion.

    ``odom_topic``/``imu_topic`` None take ekf.yaml's ``odom0``/``imu0``. ``ekf_config`` is a
    path or a :class:`~geozoom_ros.eval.fusion.FusionConfig`. Returns :class:`BagEvaluation`.
    """
    from geozoom_ros.geo import LocalFrame
    from geozoom_ros.localizer import GeoZoomLocalizer

    config = ekf_config if isinstance(ekf_config, F.FusionConfig) else \
        F.load_ekf_config(ekf_config)
    if every < 1:
        raise InputError(f'--every {every} must be at least 1')
    bag = read_bag(bag_path, image_topic, gt_topic,
                   config.odom_topic if odom_topic is None else odom_topic,
                   (config.imu_topic or '') if imu_topic is None else imu_topic)
    loc = localizer or GeoZoomLocalizer(bundle, model, backend=backend, beam_width=beam_width,
                                        method=method)
    if bag.frame is None:
        w, s, e, n = loc.bundle.bounds
        bag.set_frame(LocalFrame(0.5 * (s + n), 0.5 * (w + e)))
    gate = gate or Gate()
    frames = localize_frames(bag, loc, every=every, gate=gate, prior=prior,
                             fusion_config=config, limit=limit, progress=progress)
    info = {'bundle': str(bundle), 'model': str(model),
            'options': {'every': every, 'method': method, 'beam_width': beam_width,
                        'prior': prior, 'backend': type(loc.backend).__name__}}
    ev = evaluate(bag, frames, gate, config, info)
    ev.map_path = map_path_of_bundle(bundle)
    return ev
