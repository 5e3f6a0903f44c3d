"""The synthetic drive: a route through the city, vehicle motion, sensors and a rosbag2.

Frames and conventions (REP-103 / REP-105):

- Positions are East-North-Up metres in the city's :class:`geozoom_ros.geo.LocalFrame`.
- ``yaw`` is the ENU yaw in radians: 0 = facing east, counter-clockwise positive.
- ``heading_deg`` (what the renderer and the dataset index use) is the compass heading in
  degrees: 0 = north, clockwise positive; ``heading_deg = 90 - degrees(yaw)``.
- The odometry is integrated in the ``odom`` frame, whose origin and axes are the vehicle's
  pose at the start of the drive; the IMU orientation is earth-referenced (ENU).

The bag is written with rosbags (no rclpy); its topics are listed in :data:`DRIVE_TOPICS`.
Nothing here imports torch or rclpy.
"""

from dataclasses import asdict, dataclass
import json
import math
import os
from pathlib import Path
import shutil
import tempfile

import numpy as np

from geozoom_ros.errors import InputError

# --------------------------------------------------------------------------------------------
# Topics and frames of the drive bag

#: Raw camera frames, ``sensor_msgs/msg/Image`` with encoding ``rgb8``.
TOPIC_IMAGE = '/camera/image_raw'
#: The same frames as JPEG, ``sensor_msgs/msg/CompressedImage`` (image_transport's name).
TOPIC_IMAGE_COMPRESSED = '/camera/image_raw/compressed'
#: Pinhole intrinsics matching the frames, ``sensor_msgs/msg/CameraInfo``.
TOPIC_CAMERA_INFO = '/camera/camera_info'
#: Ground-truth position of the vehicle, ``sensor_msgs/msg/NavSatFix`` (never fused).
TOPIC_GPS_TRUTH = '/gps/fix_truth'
#: Simulated wheel odometry, ``nav_msgs/msg/Odometry`` (odom -> base_link).
TOPIC_ODOM = '/odom'
#: Simulated IMU with earth-referenced (ENU) orientation, ``sensor_msgs/msg/Imu``.
TOPIC_IMU = '/imu/data'
#: odom -> base_link transforms, ``tf2_msgs/msg/TFMessage`` (only with ``include_tf``).
TOPIC_TF = '/tf'

#: Topic -> message type of every topic a drive bag may hold.
DRIVE_TOPICS = {
    TOPIC_IMAGE: 'sensor_msgs/msg/Image',
    TOPIC_IMAGE_COMPRESSED: 'sensor_msgs/msg/CompressedImage',
    TOPIC_CAMERA_INFO: 'sensor_msgs/msg/CameraInfo',
    TOPIC_GPS_TRUTH: 'sensor_msgs/msg/NavSatFix',
    TOPIC_ODOM: 'nav_msgs/msg/Odometry',
    TOPIC_IMU: 'sensor_msgs/msg/Imu',
    TOPIC_TF: 'tf2_msgs/msg/TFMessage',
}

FRAME_CAMERA = 'camera_optical_frame'
FRAME_BASE = 'base_link'
FRAME_ODOM = 'odom'

#: Bag start time (ns since the Unix epoch) so the same seed gives the same bag.
DEFAULT_START_NS = 1_700_000_000_000_000_000
#: Key of the JSON description of the drive in the bag's metadata ``custom_data``.
CUSTOM_DATA_KEY = 'geozoom.drive'

GRAVITY = 9.80665
_DEFAULT_ROAD_WIDTH_M = 8.0


def yaw_to_heading_deg(yaw_rad):
    """Convert ENU yaw (radians, 0 = east, CCW) to compass heading (degrees, 0 = north, CW)."""
    return np.mod(90.0 - np.degrees(yaw_rad), 360.0)


def heading_deg_to_yaw(heading_deg):
    """Convert compass heading (degrees, 0 = north, CW) to ENU yaw in radians (-pi, pi]."""
    return np.angle(np.exp(1j * np.radians(90.0 - np.asarray(heading_deg, dtype=float))))


# --------------------------------------------------------------------------------------------
# Road graph

@dataclass
class RoadEdge:
    """A stretch of road between two graph nodes; ``geometry`` (K, 2) runs from ``u`` to ``v``."""

    u: int
    v: int
    geometry: np.ndarray
    length_m: float
    width_m: float


class RoadGraph:
    """An undirected road network: nodes at intersections and road ends, ENU metres.

    Built by :func:`build_road_graph`: polylines are cut where they cross or touch each other
    and the cut points that lie within ``snap_m`` of each other become one node.
    """

    def __init__(self, nodes, edges):
        self.nodes = np.asarray(nodes, dtype=float).reshape(-1, 2)
        self.edges = list(edges)
        self.adjacency = [[] for _ in range(len(self.nodes))]
        for i, e in enumerate(self.edges):
            self.adjacency[e.u].append((i, True))
            self.adjacency[e.v].append((i, False))

    def components(self):
        """Return the connected components as lists of node ids, largest (by length) first."""
        seen = np.zeros(len(self.nodes), bool)
        comps = []
        for start in range(len(self.nodes)):
            if seen[start] or not self.adjacency[start]:
                continue
            stack, comp = [start], []
            seen[start] = True
            while stack:
                n = stack.pop()
                comp.append(n)
                for ei, _ in self.adjacency[n]:
                    e = self.edges[ei]
                    for m in (e.u, e.v):
                        if not seen[m]:
                            seen[m] = True
                            stack.append(m)
            comps.append(comp)

        def total_length(comp):
            members = set(comp)
            return sum(e.length_m for e in self.edges if e.u in members)
        return sorted(comps, key=total_length, reverse=True)

    def degree(self, node):
        """Return the number of edge ends at ``node``."""
        return len(self.adjacency[node])


def _road_arrays(roads):
    """Return [(polyline (N, 2) float, width_m)] of roads given as arrays or Road objects."""
    out = []
    for r in roads:
        line = getattr(r, 'polyline', r)
        width = float(getattr(r, 'width_m', _DEFAULT_ROAD_WIDTH_M))
        line = np.asarray(line, dtype=float)
        if line.ndim != 2 or line.shape[1] != 2 or not np.all(np.isfinite(line)):
            raise InputError(f'road polyline of shape {line.shape} is not an (N, 2) array of '
                             'finite ENU metres')
        keep = np.ones(len(line), bool)
        keep[1:] = np.linalg.norm(np.diff(line, axis=0), axis=1) > 1e-6
        line = line[keep]
        if len(line) >= 2:
            out.append((line, width))
    return out


def _segment_intersections(a0, a1, b0, b1, eps=1e-9):
    """Return (t, u, hit) of segment pairs (broadcast): a0 + t (a1 - a0) = b0 + u (b1 - b0)."""
    da = a1 - a0
    db = b1 - b0
    den = da[..., 0] * db[..., 1] - da[..., 1] * db[..., 0]
    diff = b0 - a0
    with np.errstate(divide='ignore', invalid='ignore'):
        t = (diff[..., 0] * db[..., 1] - diff[..., 1] * db[..., 0]) / den
        u = (diff[..., 0] * da[..., 1] - diff[..., 1] * da[..., 0]) / den
    hit = (np.abs(den) > eps) & (t >= -1e-9) & (t <= 1 + 1e-9) & (u >= -1e-9) & (u <= 1 + 1e-9)
    return t, u, hit


def build_road_graph(roads, snap_m=1.5):
    """Build the :class:`RoadGraph` of road polylines (ENU metres).

    ``roads`` is a list of (N, 2) arrays or objects with ``.polyline`` and ``.width_m``. Roads
    are cut where they cross, and where a road's end lies within ``snap_m`` metres of another
    road (a T-junction drawn a little short or long); cut points closer than ``snap_m`` merge
    into one node.
    """
    lines = _road_arrays(roads)
    if not lines:
        raise InputError('the city has no roads with at least two distinct points; '
                         'a drive needs a road network')
    seg_a, seg_b, seg_line, seg_idx = [], [], [], []
    for li, (line, _) in enumerate(lines):
        seg_a.append(line[:-1])
        seg_b.append(line[1:])
        seg_line.append(np.full(len(line) - 1, li))
        seg_idx.append(np.arange(len(line) - 1))
    A = np.concatenate(seg_a)
    B = np.concatenate(seg_b)
    L = np.concatenate(seg_line)
    Ix = np.concatenate(seg_idx)
    S = len(A)
    lo = np.minimum(A, B) - snap_m
    hi = np.maximum(A, B) + snap_m
    # cuts[line] = list of (segment index, t) where the line is cut
    cuts = [[(0, 0.0), (len(line) - 2, 1.0)] for line, _ in lines]

    chunk = 512
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        overlap = ((lo[s0:s1, None, 0] <= hi[None, :, 0]) & (hi[s0:s1, None, 0] >= lo[None, :, 0])
                   & (lo[s0:s1, None, 1] <= hi[None, :, 1])
                   & (hi[s0:s1, None, 1] >= lo[None, :, 1]))
        ii, jj = np.nonzero(overlap)
        keep = ii + s0 < jj  # each unordered pair once
        ii, jj = ii[keep] + s0, jj[keep]
        same = L[ii] == L[jj]
        keep = ~same | (np.abs(Ix[ii] - Ix[jj]) > 1)  # neighbours on one line share a vertex
        ii, jj = ii[keep], jj[keep]
        if len(ii) == 0:
            continue
        t, u, hit = _segment_intersections(A[ii], B[ii], A[jj], B[jj])
        for k in np.nonzero(hit)[0]:
            cuts[L[ii[k]]].append((int(Ix[ii[k]]), float(np.clip(t[k], 0, 1))))
            cuts[L[jj[k]]].append((int(Ix[jj[k]]), float(np.clip(u[k], 0, 1))))

    # Road ends that stop short of (or overshoot) another road join it at the nearest point.
    for li, (line, _) in enumerate(lines):
        for end, own_seg in ((line[0], 0), (line[-1], len(line) - 2)):
            d = B - A
            lens2 = np.maximum(np.einsum('ij,ij->i', d, d), 1e-12)
            t = np.clip(np.einsum('ij,ij->i', end - A, d) / lens2, 0.0, 1.0)
            proj = A + t[:, None] * d
            dist = np.linalg.norm(proj - end, axis=1)
            dist[(L == li) & (np.abs(Ix - own_seg) <= 1)] = np.inf
            k = int(np.argmin(dist))
            if dist[k] <= snap_m:
                cuts[L[k]].append((int(Ix[k]), float(t[k])))

    # Cut points -> nodes (merge within snap_m through a grid hash and union-find).
    pts, owners = [], []
    for li, (line, _) in enumerate(lines):
        uniq = sorted(set((s, round(t, 9)) for s, t in cuts[li]))
        for s, t in uniq:
            pts.append(line[s] + t * (line[s + 1] - line[s]))
            owners.append((li, s, t))
    pts = np.asarray(pts)
    parent = list(range(len(pts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cell = np.floor(pts / snap_m).astype(np.int64)
    buckets = {}
    for i, key in enumerate(map(tuple, cell)):
        buckets.setdefault(key, []).append(i)
    for i, (cx, cy) in enumerate(cell):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for j in buckets.get((cx + dx, cy + dy), ()):
                    if j > i and np.hypot(*(pts[i] - pts[j])) <= snap_m:
                        ri, rj = find(i), find(j)
                        if ri != rj:
                            parent[rj] = ri
    roots = sorted(set(find(i) for i in range(len(pts))))
    node_of_root = {r: n for n, r in enumerate(roots)}
    node_id = np.array([node_of_root[find(i)] for i in range(len(pts))])
    nodes = np.zeros((len(roots), 2))
    counts = np.zeros(len(roots))
    np.add.at(nodes, node_id, pts)
    np.add.at(counts, node_id, 1)
    nodes /= counts[:, None]

    edges = []
    by_line = {}
    for i, (li, s, t) in enumerate(owners):
        by_line.setdefault(li, []).append((s, t, i))
    for li, items in by_line.items():
        line, width = lines[li]
        items.sort()
        for (s0, t0, i0), (s1, t1, i1) in zip(items[:-1], items[1:]):
            n0, n1 = node_id[i0], node_id[i1]
            inner = line[s0 + 1:s1 + 1] if s1 > s0 else line[0:0]
            geom = np.vstack([nodes[n0][None], inner, nodes[n1][None]])
            keep = np.ones(len(geom), bool)
            keep[1:] = np.linalg.norm(np.diff(geom, axis=0), axis=1) > 1e-6
            geom = geom[keep]
            length = float(np.sum(np.linalg.norm(np.diff(geom, axis=0), axis=1)))
            if len(geom) < 2 or length < 1e-3 or (n0 == n1 and length <= 2 * snap_m):
                continue
            edges.append(RoadEdge(int(n0), int(n1), geom, length, width))
    if not edges:
        raise InputError('the road network has no usable road stretches; a drive needs roads '
                         'longer than the snapping distance')
    return RoadGraph(nodes, edges)


# --------------------------------------------------------------------------------------------
# Route planning

def _resample(points, spacing_m):
    """Resample a polyline at equal arclength spacing (metres), keeping both ends."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    keep = np.concatenate([[True], seg > 1e-9])
    s, points = s[keep], points[keep]
    n = max(2, int(math.floor(s[-1] / spacing_m)) + 1)
    q = np.linspace(0.0, (n - 1) * spacing_m, n)
    return np.stack([np.interp(q, s, points[:, 0]), np.interp(q, s, points[:, 1])], axis=1)


def _smooth(points, window):
    """Average over a moving ``window`` of samples, ends held (no shrinkage at the ends)."""
    if window < 2:
        return points
    half = window // 2
    padded = np.concatenate([np.repeat(points[:1], half, 0), points,
                             np.repeat(points[-1:], half, 0)])
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    return np.stack([np.convolve(padded[:, k], kernel, mode='valid') for k in range(2)], axis=1)


def _right(d):
    """Right-hand normal of ENU direction vectors."""
    return np.stack([d[..., 1], -d[..., 0]], axis=-1)


def _offset_piece(geom, offset):
    """Offset an oriented polyline to its right by ``offset`` metres (miter joins inside)."""
    d = np.diff(geom, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    n = _right(d)
    out = np.empty_like(geom)
    out[0] = geom[0] + offset * n[0]
    out[-1] = geom[-1] + offset * n[-1]
    for i in range(1, len(geom) - 1):
        m = n[i - 1] + n[i]
        scale = min(2.0 / max(float(np.dot(m, m)), 1e-9), 4.0)
        out[i] = geom[i] + offset * m * scale
    return out


def _join_pieces(pieces, uturns):
    """Join lane pieces (offset polylines of consecutive edges) into one polyline.

    ``pieces``: [(lane polyline, centre-line polyline)] per traversed edge. Before a piece
    whose index is in ``uturns`` the lane goes round the road's end on a half circle (a left
    turn about the node). Elsewhere consecutive lanes are cut or extended to where they cross
    (a miter), unless that point lies beyond their end segments or far out (then the lanes
    are simply connected and the smoothing rounds the step).
    """
    pts = [p for p in pieces[0][0]]
    for k in range(1, len(pieces)):
        lane = pieces[k][0]
        if k in uturns:
            node = pieces[k - 1][1][-1]
            rel = pts[-1] - node
            r, ang0 = float(np.hypot(*rel)), math.atan2(rel[1], rel[0])
            pts.extend(node + r * np.array([math.cos(ang0 + t), math.sin(ang0 + t)])
                       for t in np.linspace(0.0, math.pi, 9)[1:-1])
            pts.extend(lane)
            continue
        a0, a1, b0, b1 = pts[-2], pts[-1], lane[0], lane[1]
        da, db = a1 - a0, b1 - b0
        den = da[0] * db[1] - da[1] * db[0]
        corner = None
        if abs(den) > 1e-6 * np.linalg.norm(da) * np.linalg.norm(db):
            diff = b0 - a0
            t = (diff[0] * db[1] - diff[1] * db[0]) / den
            u = (diff[0] * da[1] - diff[1] * da[0]) / den
            cand = a0 + t * da
            reach = 3.0 * max(np.linalg.norm(a1 - b0), 1.0)
            if t > 0.05 and u < 0.95 and np.linalg.norm(cand - a1) <= reach:
                corner = cand
        if corner is not None:
            pts[-1] = corner
            pts.extend(lane[1:])
        else:
            pts.extend(lane)
    pts = np.asarray(pts)
    keep = np.ones(len(pts), bool)
    keep[1:] = np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-6
    return pts[keep]


def plan_route(roads, length_m, rng, *, spacing_m=1.0, lane_offset_m=None, smooth_m=8.0,
               snap_m=1.5):
    """Plan a continuous drive of at least ``length_m`` metres along a road network.

    ``roads``: (N, 2) ENU polylines (metres) or objects with ``.polyline`` and ``.width_m``;
    ``rng``: a numpy Generator. The route starts on a random road of the largest connected
    part of the network, drives on the right-hand lane (offset ``width / 4`` from the centre
    line unless ``lane_offset_m`` is given), picks a random exit at every intersection and
    turns back only at dead ends. Corners are rounded over ``smooth_m`` metres. Returns an
    (M, 2) array of ENU points ``spacing_m`` metres apart along the route.
    """
    if not (np.isfinite(length_m) and length_m > 0):
        raise InputError(f'route length {length_m} m must be a positive number of metres')
    graph = build_road_graph(roads, snap_m=snap_m)
    comp = graph.components()[0]
    members = set(comp)
    candidates = [i for i, e in enumerate(graph.edges) if e.u in members]
    lengths = np.array([graph.edges[i].length_m for i in candidates])
    edge = candidates[int(rng.choice(len(candidates), p=lengths / lengths.sum()))]
    forward = bool(rng.integers(2))

    pieces, uturns = [], set()
    total = 0.0
    # Rounding the corners shortens the route: keep 10 % in hand besides the trimmed ends.
    margin = 2.0 * smooth_m + 10.0 + 0.1 * length_m
    while total < length_m + margin:
        e = graph.edges[edge]
        geom = e.geometry if forward else e.geometry[::-1]
        o = e.width_m / 4.0 if lane_offset_m is None else float(lane_offset_m)
        pieces.append((_offset_piece(geom, o), geom))
        total += e.length_m
        end = e.v if forward else e.u
        options = [(ei, fw) for ei, fw in graph.adjacency[end]
                   if not (ei == edge and fw != forward)]
        if not options:
            uturns.add(len(pieces))
            edge, forward = edge, not forward
            continue
        # Prefer going on roughly straight a little more often than turning, as drivers do.
        d_in = geom[-1] - geom[-2]
        weights = []
        for ei, fw in options:
            g = graph.edges[ei].geometry if fw else graph.edges[ei].geometry[::-1]
            d_out = g[1] - g[0]
            cos = np.dot(d_in, d_out) / (np.linalg.norm(d_in) * np.linalg.norm(d_out) + 1e-12)
            weights.append(1.5 if cos > 0.7 else 1.0)
        weights = np.asarray(weights) / np.sum(weights)
        edge, forward = options[int(rng.choice(len(options), p=weights))]

    lane = _join_pieces(pieces, uturns)
    fine = _resample(lane, 0.5)
    fine = _smooth(fine, int(round(smooth_m / 0.5)))
    route = _resample(fine, spacing_m)
    # Cut off the start where smoothing held the end fixed, and trim to the length asked for.
    skip = int(math.ceil(smooth_m / spacing_m))
    route = route[skip:]
    n = int(math.ceil(length_m / spacing_m)) + 1
    if len(route) < n:
        raise InputError(f'could not plan a {length_m:.0f} m route on this road network')
    return route[:n]


def route_length_m(route):
    """Return the length of an (M, 2) route in metres."""
    return float(np.sum(np.linalg.norm(np.diff(np.asarray(route), axis=0), axis=1)))


# --------------------------------------------------------------------------------------------
# Vehicle motion

@dataclass
class MotionParams:
    """Vehicle speed model (m/s, m/s^2, metres)."""

    min_speed_mps: float = 5.0      #: slowest cruising speed (turns may be slower)
    max_speed_mps: float = 12.0     #: fastest cruising speed
    turn_speed_floor_mps: float = 3.0  #: slowest speed through the tightest turns
    max_lateral_accel: float = 2.5  #: speed limit in turns: v <= sqrt(a_lat / curvature)
    max_accel: float = 1.2          #: longitudinal acceleration limit
    max_decel: float = 2.0          #: braking limit
    cruise_stretch_m: tuple = (150.0, 400.0)  #: length of road at one cruise speed
    heading_smooth_m: float = 4.0   #: arclength window of the heading estimate


@dataclass
class Trajectory:
    """Vehicle states sampled at times ``t`` (seconds from the start of the drive).

    ``east``/``north`` ENU metres, ``yaw`` ENU radians (unwrapped, 0 = east, CCW),
    ``speed`` m/s, ``yaw_rate`` rad/s (CCW positive), ``accel`` m/s^2 along the heading,
    ``s`` arclength along the route in metres.
    """

    t: np.ndarray
    east: np.ndarray
    north: np.ndarray
    yaw: np.ndarray
    speed: np.ndarray
    yaw_rate: np.ndarray
    accel: np.ndarray
    s: np.ndarray

    def __len__(self):
        return len(self.t)

    @property
    def heading_deg(self):
        """Compass heading in degrees (0 = north, clockwise)."""
        return yaw_to_heading_deg(self.yaw)

    def positions(self):
        """Return (K, 2) ENU positions in metres."""
        return np.stack([self.east, self.north], axis=1)


class MotionProfile:
    """Speed along a route: arclength ``s`` (m), speed ``v`` (m/s) and time ``t`` (s)."""

    def __init__(self, route, s, v, yaw):
        self.route = route
        self.s = s
        self.v = v
        self.yaw = yaw
        dt = 2.0 * np.diff(s) / (v[:-1] + v[1:])
        self.t = np.concatenate([[0.0], np.cumsum(dt)])
        # The yaw rate is the exact derivative of the piecewise-linear yaw(s), so integrating
        # it gives back the yaw (odometry must not see a model error a real vehicle has not).
        self.dyaw_ds = np.diff(yaw) / np.diff(s)
        self.dv_ds = np.gradient(v, s)

    @property
    def duration_s(self):
        """Time to drive the whole route in seconds."""
        return float(self.t[-1])

    def sample(self, times):
        """Return the :class:`Trajectory` at ``times`` (seconds, within the drive)."""
        times = np.asarray(times, dtype=float)
        s = np.interp(times, self.t, self.s)
        v = np.interp(s, self.s, self.v)
        seg = np.clip(np.searchsorted(self.s, s, side='right') - 1, 0, len(self.s) - 2)
        return Trajectory(
            t=times,
            east=np.interp(s, self.s, self.route[:, 0]),
            north=np.interp(s, self.s, self.route[:, 1]),
            yaw=np.interp(s, self.s, self.yaw),
            speed=v,
            yaw_rate=self.dyaw_ds[seg] * v,
            accel=np.interp(s, self.s, self.dv_ds) * v,
            s=s)

    def sample_rate(self, rate_hz):
        """Return the :class:`Trajectory` sampled at ``rate_hz`` from t = 0 to the end."""
        n = int(math.floor(self.duration_s * rate_hz + 1e-9)) + 1
        return self.sample(np.arange(n) / float(rate_hz))


def simulate_motion(route, rng, params=None):
    """Return the :class:`MotionProfile` of a vehicle driving an (M, 2) ENU route.

    Cruise speeds between ``min_speed_mps`` and ``max_speed_mps`` change every few hundred
    metres; turns slow the vehicle so the lateral acceleration stays below
    ``max_lateral_accel``; accelerations and braking are limited and smoothed.
    """
    p = params or MotionParams()
    route = np.asarray(route, dtype=float)
    seg = np.linalg.norm(np.diff(route, axis=0), axis=1)
    if len(route) < 3 or np.any(seg <= 0):
        raise InputError('a route needs at least three distinct points')
    s = np.concatenate([[0.0], np.cumsum(seg)])
    d = np.gradient(route, s, axis=0)
    yaw = np.unwrap(np.arctan2(d[:, 1], d[:, 0]))
    ds = float(np.mean(seg))
    w = max(1, int(round(p.heading_smooth_m / ds)))
    if w > 1:
        yaw = _smooth(yaw[:, None].repeat(2, 1), w)[:, 0]
    curv = np.abs(np.gradient(yaw, s))

    cruise = np.empty_like(s)
    pos = 0.0
    while pos <= s[-1]:
        stretch = rng.uniform(*p.cruise_stretch_m)
        cruise[(s >= pos) & (s < pos + stretch)] = rng.uniform(p.min_speed_mps, p.max_speed_mps)
        pos += stretch
    with np.errstate(divide='ignore'):
        turn = np.sqrt(p.max_lateral_accel / np.maximum(curv, 1e-9))
    # A turn's slowdown is needed over the whole bend, not only at its sharpest point.
    win = max(1, int(round(10.0 / ds)))
    turn = -_max_filter(-turn, win)
    v = np.clip(np.minimum(cruise, np.maximum(turn, p.turn_speed_floor_mps)),
                p.turn_speed_floor_mps, p.max_speed_mps)
    v[0] = min(v[0], p.min_speed_mps)
    for i in range(1, len(v)):
        v[i] = min(v[i], math.sqrt(v[i - 1] ** 2 + 2 * p.max_accel * seg[i - 1]))
    for i in range(len(v) - 2, -1, -1):
        v[i] = min(v[i], math.sqrt(v[i + 1] ** 2 + 2 * p.max_decel * seg[i]))
    # Smooth the bang-bang profile so the acceleration (and the jerk) stays continuous.
    vs = _smooth(v[:, None].repeat(2, 1), max(1, int(round(15.0 / ds))))[:, 0]
    vs = np.clip(vs, p.turn_speed_floor_mps, p.max_speed_mps)
    return MotionProfile(route, s, vs, yaw)


def _max_filter(x, window):
    half = window // 2
    padded = np.concatenate([np.full(half, x[0]), x, np.full(half, x[-1])])
    view = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    return view.max(axis=1)


# --------------------------------------------------------------------------------------------
# Sensors

@dataclass
class OdomNoise:
    """Wheel-odometry error model (drawn once per drive, then fixed or slowly drifting).

    The speed scale error (tyre radius) and the yaw-rate scale error (track width) are drawn
    from zero-mean normals with the given standard deviations; the yaw-rate bias starts from a
    normal and then random-walks.
    """

    speed_scale_sigma: float = 0.015          #: relative (1.5 %)
    yaw_rate_scale_sigma: float = 0.02        #: relative (track-width error)
    yaw_rate_bias_sigma: float = 1e-3         #: rad/s, initial bias
    yaw_rate_bias_walk: float = 2e-5          #: rad/s per sqrt(s)
    speed_noise: float = 0.05                 #: m/s, white, per sample
    yaw_rate_noise: float = 0.005             #: rad/s, white, per sample
    pose_sigma_per_m: float = 0.02            #: reported xy standard deviation per metre driven
    yaw_sigma_per_s: float = 1e-3             #: reported yaw standard deviation growth, rad/s


@dataclass
class ImuNoise:
    """IMU error model: an AHRS giving earth-referenced orientation, gyro and accelerometer."""

    yaw_noise_deg: float = 0.5                #: white noise of the reported yaw
    yaw_bias_sigma_deg: float = 2.0           #: stationary std of the slowly varying yaw error
    yaw_bias_tau_s: float = 120.0             #: correlation time of that error
    roll_pitch_noise_deg: float = 0.2         #: white noise of roll and pitch
    gyro_noise: float = 0.003                 #: rad/s, white
    gyro_bias_sigma: float = 0.002            #: rad/s, initial bias
    gyro_bias_walk: float = 1e-4              #: rad/s per sqrt(s)
    accel_noise: float = 0.05                 #: m/s^2, white
    accel_bias_sigma: float = 0.05            #: m/s^2, constant per axis


@dataclass
class OdomTrack:
    """Dead-reckoned odometry in the ``odom`` frame (origin = start pose) at times ``t``.

    ``x``/``y`` metres, ``yaw`` radians in the odom frame, ``vx`` m/s and ``wz`` rad/s
    measured in base_link, ``pose_cov``/``twist_cov`` (K, 6, 6) covariances (x y z roll
    pitch yaw), ``start`` the start pose (east, north, yaw) in ENU that defines the frame.
    """

    t: np.ndarray
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    vx: np.ndarray
    wz: np.ndarray
    pose_cov: np.ndarray
    twist_cov: np.ndarray
    start: tuple

    def __len__(self):
        return len(self.t)

    def to_enu(self):
        """Return the odometry positions (K, 2) mapped into ENU through the start pose."""
        e0, n0, y0 = self.start
        c, s = math.cos(y0), math.sin(y0)
        return np.stack([e0 + c * self.x - s * self.y, n0 + s * self.x + c * self.y], axis=1)


@dataclass
class ImuTrack:
    """IMU readings at times ``t`` (seconds), with the covariances the messages carry.

    Orientation as ENU roll/pitch/yaw (radians, earth-referenced), angular velocity (K, 3)
    rad/s and linear acceleration (K, 3) m/s^2 in base_link (gravity included: +9.81 on z
    at rest, REP-145).
    """

    t: np.ndarray
    roll: np.ndarray
    pitch: np.ndarray
    yaw: np.ndarray
    angular_velocity: np.ndarray
    linear_acceleration: np.ndarray
    orientation_cov: np.ndarray
    angular_velocity_cov: np.ndarray
    linear_acceleration_cov: np.ndarray

    def __len__(self):
        return len(self.t)


def simulate_odometry(truth, rng, params=None):
    """Simulate wheel odometry of a :class:`Trajectory` and integrate it in the odom frame.

    Measured speed = true speed x (1 + scale error) + noise; measured yaw rate = true yaw rate
    x (1 + scale error) + a random-walking bias + noise (see :class:`OdomNoise`). Returns an
    :class:`OdomTrack` whose drift grows with the distance driven, as real odometry does.
    """
    p = params or OdomNoise()
    t = np.asarray(truth.t, dtype=float)
    n = len(t)
    dt = np.diff(t, prepend=t[0])
    speed_scale = 1.0 + rng.normal(0.0, p.speed_scale_sigma)
    yaw_scale = 1.0 + rng.normal(0.0, p.yaw_rate_scale_sigma)
    bias = rng.normal(0.0, p.yaw_rate_bias_sigma) + np.cumsum(
        rng.normal(0.0, 1.0, n) * p.yaw_rate_bias_walk * np.sqrt(dt))
    vx = truth.speed * speed_scale + rng.normal(0.0, p.speed_noise, n)
    wz = truth.yaw_rate * yaw_scale + bias + rng.normal(0.0, p.yaw_rate_noise, n)
    # Midpoint integration from the start pose (odom frame = start pose).
    yaw = np.concatenate([[0.0], np.cumsum(0.5 * (wz[1:] + wz[:-1]) * dt[1:])])
    mid_yaw = np.concatenate([[0.0], 0.5 * (yaw[1:] + yaw[:-1])])
    mid_v = np.concatenate([[0.0], 0.5 * (vx[1:] + vx[:-1])])
    x = np.cumsum(mid_v * np.cos(mid_yaw) * dt)
    y = np.cumsum(mid_v * np.sin(mid_yaw) * dt)
    dist = np.cumsum(np.abs(mid_v) * dt)
    pose_cov = np.zeros((n, 6, 6))
    sxy = 0.05 + p.pose_sigma_per_m * dist
    pose_cov[:, 0, 0] = pose_cov[:, 1, 1] = sxy ** 2
    pose_cov[:, 2, 2] = pose_cov[:, 3, 3] = pose_cov[:, 4, 4] = 1e3  # not measured
    pose_cov[:, 5, 5] = (0.01 + p.yaw_sigma_per_s * (t - t[0])) ** 2
    twist_cov = np.zeros((n, 6, 6))
    twist_cov[:, 0, 0] = (p.speed_noise + p.speed_scale_sigma * np.abs(vx)) ** 2
    twist_cov[:, 1, 1] = twist_cov[:, 2, 2] = 1e-4  # non-holonomic: no sideways/vertical motion
    twist_cov[:, 3, 3] = twist_cov[:, 4, 4] = 1e3
    twist_cov[:, 5, 5] = (p.yaw_rate_noise + p.yaw_rate_bias_sigma) ** 2
    start = (float(truth.east[0]), float(truth.north[0]), float(truth.yaw[0]))
    return OdomTrack(t, x, y, yaw, vx, wz, pose_cov, twist_cov, start)


def _rotation_matrices(roll, pitch, yaw):
    """Body -> ENU rotations (K, 3, 3), ZYX (yaw-pitch-roll) order."""
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    R = np.empty(roll.shape + (3, 3))
    R[..., 0, 0] = cy * cp
    R[..., 0, 1] = cy * sp * sr - sy * cr
    R[..., 0, 2] = cy * sp * cr + sy * sr
    R[..., 1, 0] = sy * cp
    R[..., 1, 1] = sy * sp * sr + cy * cr
    R[..., 1, 2] = sy * sp * cr - cy * sr
    R[..., 2, 0] = -sp
    R[..., 2, 1] = cp * sr
    R[..., 2, 2] = cp * cr
    return R


def body_attitude(truth):
    """Return the true (roll, pitch) of the body in radians (REP-103 signs).

    The body squats under acceleration and leans outwards in turns, about 0.6 degrees per
    m/s^2.
    """
    k = 0.01
    return k * truth.speed * truth.yaw_rate, -k * truth.accel


def simulate_imu(truth, rng, params=None):
    """Simulate an AHRS-type IMU on a :class:`Trajectory` (see :class:`ImuNoise`).

    The orientation is earth-referenced (ENU yaw, REP-103/105) with white noise plus a slowly
    varying (first-order Gauss-Markov) yaw error, as from a magnetometer-aided filter. Angular
    velocity and specific force are in base_link with bias and noise.
    """
    p = params or ImuNoise()
    t = np.asarray(truth.t, dtype=float)
    n = len(t)
    dt = np.diff(t, prepend=t[0])
    roll, pitch = body_attitude(truth)
    yaw = np.asarray(truth.yaw, dtype=float)

    sig_b = math.radians(p.yaw_bias_sigma_deg)
    yaw_err = np.empty(n)
    yaw_err[0] = rng.normal(0.0, sig_b)
    phi = np.exp(-dt / p.yaw_bias_tau_s)
    drive = rng.normal(0.0, 1.0, n) * sig_b * np.sqrt(1.0 - phi ** 2)
    for i in range(1, n):
        yaw_err[i] = phi[i] * yaw_err[i - 1] + drive[i]
    rp_noise = math.radians(p.roll_pitch_noise_deg)
    m_roll = roll + rng.normal(0.0, rp_noise, n)
    m_pitch = pitch + rng.normal(0.0, rp_noise, n)
    m_yaw = yaw + yaw_err + rng.normal(0.0, math.radians(p.yaw_noise_deg), n)

    rates = np.stack([np.gradient(roll, t) if n > 1 else np.zeros(n),
                      np.gradient(pitch, t) if n > 1 else np.zeros(n),
                      truth.yaw_rate], axis=1)
    gyro_bias = rng.normal(0.0, p.gyro_bias_sigma, 3) + np.cumsum(
        rng.normal(0.0, 1.0, (n, 3)) * p.gyro_bias_walk * np.sqrt(dt)[:, None], axis=0)
    gyro = rates + gyro_bias + rng.normal(0.0, p.gyro_noise, (n, 3))

    lat = truth.speed * truth.yaw_rate
    a_world = np.stack([truth.accel * np.cos(yaw) - lat * np.sin(yaw),
                        truth.accel * np.sin(yaw) + lat * np.cos(yaw),
                        np.full(n, GRAVITY)], axis=1)
    R = _rotation_matrices(roll, pitch, yaw)
    f_body = np.einsum('kji,kj->ki', R, a_world)
    accel = f_body + rng.normal(0.0, p.accel_bias_sigma, 3) + rng.normal(
        0.0, p.accel_noise, (n, 3))

    o_cov = np.zeros((n, 3, 3))
    o_cov[:, 0, 0] = o_cov[:, 1, 1] = rp_noise ** 2
    o_cov[:, 2, 2] = math.radians(p.yaw_noise_deg) ** 2 + sig_b ** 2
    w_cov = np.broadcast_to(np.eye(3) * (p.gyro_noise ** 2 + p.gyro_bias_sigma ** 2), (n, 3, 3))
    a_cov = np.broadcast_to(np.eye(3) * (p.accel_noise ** 2 + p.accel_bias_sigma ** 2),
                            (n, 3, 3))
    return ImuTrack(t, m_roll, m_pitch, m_yaw, gyro, accel, o_cov, w_cov.copy(), a_cov.copy())


def quaternion_from_rpy(roll, pitch, yaw):
    """Return (x, y, z, w) quaternions (K, 4) of ZYX roll/pitch/yaw angles in radians."""
    cr, sr = np.cos(np.asarray(roll) / 2), np.sin(np.asarray(roll) / 2)
    cp, sp = np.cos(np.asarray(pitch) / 2), np.sin(np.asarray(pitch) / 2)
    cy, sy = np.cos(np.asarray(yaw) / 2), np.sin(np.asarray(yaw) / 2)
    return np.stack([sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy,
                     cr * cp * cy + sr * sp * sy], axis=-1)


def camera_info_fields(width, height, fov_deg):
    """Return pinhole CameraInfo fields of an undistorted camera with horizontal ``fov_deg``.

    Square pixels, principal point at the image centre (pixels), plumb_bob with zero
    distortion.
    """
    if not (0 < fov_deg < 180):
        raise InputError(f'field of view {fov_deg} degrees must be within (0, 180)')
    fx = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    cx, cy = width / 2.0, height / 2.0
    return {
        'height': int(height), 'width': int(width), 'distortion_model': 'plumb_bob',
        'd': np.zeros(5), 'k': np.array([fx, 0, cx, 0, fx, cy, 0, 0, 1], float),
        'r': np.eye(3).reshape(-1), 'p': np.array([fx, 0, cx, 0, 0, fx, cy, 0, 0, 0, 1, 0],
                                                  float),
        'binning_x': 0, 'binning_y': 0,
    }


# --------------------------------------------------------------------------------------------
# Bag writing

def _storage_plugin(storage):
    from rosbags.rosbag2 import StoragePlugin
    plugins = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
    if storage not in plugins:
        raise InputError(f'bag storage {storage!r} is unknown; use mcap or sqlite3')
    return plugins[storage]


def _prepare_output(out_path, overwrite):
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise InputError(f'{out_path} exists; choose another output path or remove it')
    parent = out_path.parent if str(out_path.parent) else Path('.')
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp_parent = Path(tempfile.mkdtemp(prefix=f'.{out_path.name}.', suffix='.partial',
                                           dir=parent))
    except OSError as exc:
        raise InputError(f'cannot write the bag to {out_path}: {exc.strerror}; choose a '
                         'writable folder') from None
    return out_path, tmp_parent


def write_drive_bag_from_poses(out_path, frame, camera_t, camera_enu, images, *, fov_deg=None,
                               odom=None, imu=None, start_ns=DEFAULT_START_NS, storage='mcap',
                               jpeg_quality=90, write_raw=True, write_compressed=True,
                               include_tf=False, altitude_m=0.0, custom_data=None,
                               progress=True, overwrite=False):
    """Write a drive rosbag2 from explicit camera poses, frames and (optional) sensor tracks.

    ``out_path``: the bag directory to create (rosbag2 layout: ``metadata.yaml`` and
    ``<name>.mcap`` or ``<name>.db3`` inside, where ``<name>`` is the folder's name without a
    ``.mcap``/``.db3`` suffix); written under a temporary name in the same folder and renamed
    when complete. ``frame``: the :class:`~geozoom_ros.geo.LocalFrame` of the ENU
    positions. ``camera_t``: (K,) seconds from the start; ``camera_enu``: (K, 2) or (K, 3)
    ENU metres (the truth that goes to :data:`TOPIC_GPS_TRUTH`); ``images``: an iterable of K
    (H, W, 3) uint8 RGB frames, consumed lazily. ``fov_deg``: the horizontal field of view
    (degrees) for CameraInfo (none is written when None). ``odom``/``imu``: an
    :class:`OdomTrack` / :class:`ImuTrack` on the same clock. Stamps are ``start_ns`` plus
    the times; the header stamp of every message equals its bag timestamp. Returns the bag
    directory.
    """
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import get_typestore, Stores
    from tqdm import tqdm

    from geozoom_ros.ros.conversions import rgb_to_compressed_fields, rgb_to_image_msg_fields

    camera_t = np.asarray(camera_t, dtype=float)
    camera_enu = np.asarray(camera_enu, dtype=float)
    if camera_t.ndim != 1 or len(camera_enu) != len(camera_t):
        raise InputError(f'{len(camera_t)} camera times but {len(camera_enu)} camera poses')
    if len(camera_t) == 0:
        raise InputError('a drive bag needs at least one camera frame')
    if np.any(np.diff(camera_t) <= 0):
        raise InputError('camera times must increase strictly')
    if not (write_raw or write_compressed):
        raise InputError('write_raw and write_compressed are both off: no image topic to write')
    plugin = _storage_plugin(storage)
    lat, lon, _ = frame.to_latlon(camera_enu[:, 0], camera_enu[:, 1], np.zeros(len(camera_enu)))
    lat, lon = np.atleast_1d(lat), np.atleast_1d(lon)

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    Time, Header = T['builtin_interfaces/msg/Time'], T['std_msgs/msg/Header']
    Vec3, Quat = T['geometry_msgs/msg/Vector3'], T['geometry_msgs/msg/Quaternion']
    Point = T['geometry_msgs/msg/Point']

    def header(ns, frame_id):
        return Header(stamp=Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000)),
                      frame_id=frame_id)

    # Events: (time ns, order, kind, index); order keeps a deterministic write order at ties.
    events = [(start_ns + int(round(t * 1e9)), 0, 'cam', i) for i, t in enumerate(camera_t)]
    if odom is not None:
        events += [(start_ns + int(round(t * 1e9)), 1, 'odom', i) for i, t in enumerate(odom.t)]
    if imu is not None:
        events += [(start_ns + int(round(t * 1e9)), 2, 'imu', i) for i, t in enumerate(imu.t)]
    events.sort()

    meta = {'frame': {'lat0': frame.lat0, 'lon0': frame.lon0, 'h0': frame.h0},
            'frames': int(len(camera_t)), 'fov_deg': fov_deg, 'start_ns': int(start_ns),
            'topics': {k: v for k, v in DRIVE_TOPICS.items() if k != TOPIC_TF or include_tf}}
    if odom is not None:
        meta['odom_start_enu'] = list(odom.start)
    meta.update(custom_data or {})

    out_path, tmp_parent = _prepare_output(out_path, overwrite)
    # rosbags names the storage file after the folder; a folder called 'drive.mcap' holds
    # 'drive.mcap' (not 'drive.mcap.mcap'). Paths in metadata.yaml are relative, so the
    # folder can be renamed afterwards.
    stem = out_path.stem if out_path.suffix in ('.mcap', '.db3') else out_path.name
    tmp_bag = tmp_parent / stem
    image_iter = iter(images)
    try:
        writer = Writer(tmp_bag, version=9, storage_plugin=plugin)
        writer.open()
        try:
            conns = {}

            def conn(topic):
                if topic not in conns:
                    conns[topic] = writer.add_connection(topic, DRIVE_TOPICS[topic],
                                                         typestore=ts)
                return conns[topic]

            # Fixed connection order, so that readers list topics the same way every time.
            for topic in (TOPIC_IMAGE if write_raw else None,
                          TOPIC_IMAGE_COMPRESSED if write_compressed else None,
                          TOPIC_CAMERA_INFO if fov_deg is not None else None,
                          TOPIC_GPS_TRUTH, TOPIC_ODOM if odom is not None else None,
                          TOPIC_IMU if imu is not None else None,
                          TOPIC_TF if include_tf and odom is not None else None):
                if topic:
                    conn(topic)

            def write(topic, ns, msg):
                writer.write(conns[topic], ns, ts.serialize_cdr(msg, DRIVE_TOPICS[topic]))

            bar = tqdm(total=len(camera_t), desc=f'drive bag {out_path.name}', unit='frame',
                       disable=not progress)
            info_fields = None
            for ns, _, kind, i in events:
                if kind == 'cam':
                    try:
                        rgb = next(image_iter)
                    except StopIteration:
                        raise InputError(f'only {i} images for {len(camera_t)} camera poses; '
                                         'give one image per pose') from None
                    rgb = np.asarray(rgb)
                    if write_raw:
                        write(TOPIC_IMAGE, ns, T['sensor_msgs/msg/Image'](
                            header=header(ns, FRAME_CAMERA), **rgb_to_image_msg_fields(rgb)))
                    if write_compressed:
                        write(TOPIC_IMAGE_COMPRESSED, ns, T['sensor_msgs/msg/CompressedImage'](
                            header=header(ns, FRAME_CAMERA),
                            **rgb_to_compressed_fields(rgb, 'jpeg', jpeg_quality)))
                    if fov_deg is not None:
                        if info_fields is None or info_fields['width'] != rgb.shape[1] or \
                                info_fields['height'] != rgb.shape[0]:
                            info_fields = camera_info_fields(rgb.shape[1], rgb.shape[0],
                                                             fov_deg)
                        roi = T['sensor_msgs/msg/RegionOfInterest'](
                            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
                        write(TOPIC_CAMERA_INFO, ns, T['sensor_msgs/msg/CameraInfo'](
                            header=header(ns, FRAME_CAMERA), roi=roi, **info_fields))
                    status = T['sensor_msgs/msg/NavSatStatus'](
                        status=T['sensor_msgs/msg/NavSatStatus'].STATUS_GBAS_FIX,
                        service=T['sensor_msgs/msg/NavSatStatus'].SERVICE_GPS)
                    write(TOPIC_GPS_TRUTH, ns, T['sensor_msgs/msg/NavSatFix'](
                        header=header(ns, FRAME_BASE), status=status,
                        latitude=float(lat[i]), longitude=float(lon[i]),
                        altitude=float(altitude_m),
                        position_covariance=np.array([1e-4, 0, 0, 0, 1e-4, 0, 0, 0, 1e-4]),
                        position_covariance_type=T['sensor_msgs/msg/NavSatFix']
                        .COVARIANCE_TYPE_KNOWN))
                    bar.update(1)
                elif kind == 'odom':
                    q = quaternion_from_rpy(0.0, 0.0, odom.yaw[i])
                    pose = T['geometry_msgs/msg/Pose'](
                        position=Point(x=float(odom.x[i]), y=float(odom.y[i]), z=0.0),
                        orientation=Quat(x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                         w=float(q[3])))
                    twist = T['geometry_msgs/msg/Twist'](
                        linear=Vec3(x=float(odom.vx[i]), y=0.0, z=0.0),
                        angular=Vec3(x=0.0, y=0.0, z=float(odom.wz[i])))
                    msg = T['nav_msgs/msg/Odometry'](
                        header=header(ns, FRAME_ODOM), child_frame_id=FRAME_BASE,
                        pose=T['geometry_msgs/msg/PoseWithCovariance'](
                            pose=pose, covariance=odom.pose_cov[i].reshape(-1).copy()),
                        twist=T['geometry_msgs/msg/TwistWithCovariance'](
                            twist=twist, covariance=odom.twist_cov[i].reshape(-1).copy()))
                    write(TOPIC_ODOM, ns, msg)
                    if include_tf:
                        tf = T['geometry_msgs/msg/TransformStamped'](
                            header=header(ns, FRAME_ODOM), child_frame_id=FRAME_BASE,
                            transform=T['geometry_msgs/msg/Transform'](
                                translation=Vec3(x=float(odom.x[i]), y=float(odom.y[i]),
                                                 z=0.0),
                                rotation=pose.orientation))
                        write(TOPIC_TF, ns, T['tf2_msgs/msg/TFMessage'](transforms=[tf]))
                else:
                    q = quaternion_from_rpy(imu.roll[i], imu.pitch[i], imu.yaw[i])
                    w, a = imu.angular_velocity[i], imu.linear_acceleration[i]
                    write(TOPIC_IMU, ns, T['sensor_msgs/msg/Imu'](
                        header=header(ns, FRAME_BASE),
                        orientation=Quat(x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                         w=float(q[3])),
                        orientation_covariance=imu.orientation_cov[i].reshape(-1).copy(),
                        angular_velocity=Vec3(x=float(w[0]), y=float(w[1]), z=float(w[2])),
                        angular_velocity_covariance=imu.angular_velocity_cov[i]
                        .reshape(-1).copy(),
                        linear_acceleration=Vec3(x=float(a[0]), y=float(a[1]), z=float(a[2])),
                        linear_acceleration_covariance=imu.linear_acceleration_cov[i]
                        .reshape(-1).copy()))
            bar.close()
            writer.set_custom_data(CUSTOM_DATA_KEY, json.dumps(meta, sort_keys=True))
        finally:
            writer.close()
        if out_path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f'.{out_path.name}.', suffix='.old',
                                          dir=out_path.parent))
            os.replace(out_path, trash / out_path.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp_bag, out_path)
    finally:
        # On failure the partial bag goes with its temporary folder: nothing at out_path.
        shutil.rmtree(tmp_parent, ignore_errors=True)
    return out_path


def read_drive_metadata(bag_path):
    """Return the drive description a drive bag carries (dict), or ``{}`` for other bags.

    Holds ``frame`` (lat0, lon0, h0 of the ENU frame), ``start_ns``, ``fov_deg``, ``topics``,
    ``odom_start_enu`` (east, north, yaw of the odom frame's origin) and, for synthetic
    drives, ``config``, ``odom_noise``, ``imu_noise`` and ``route_length_m``.
    """
    import yaml

    meta_path = Path(bag_path) / 'metadata.yaml'
    try:
        info = yaml.safe_load(meta_path.read_text())['rosbag2_bagfile_information']
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise InputError(f'{bag_path}: not a readable rosbag2 folder ({exc}); give the bag '
                         'folder that holds metadata.yaml') from None
    custom = info.get('custom_data') or {}
    text = custom.get(CUSTOM_DATA_KEY)
    return json.loads(text) if text else {}


@dataclass
class DriveConfig:
    """Settings of :func:`write_drive_bag` (recorded in the bag's custom data)."""

    length_m: float = 2000.0       #: route length, metres
    rate_hz: float = 5.0           #: camera rate, Hz
    sensor_rate_hz: float = 50.0   #: odometry and IMU rate, Hz
    seed: int = 0
    camera_height_m: float = 1.8   #: camera height above the road, metres
    fov_deg: float = 90.0          #: horizontal field of view, degrees
    storage: str = 'mcap'


def drive_truth(roads, length_m=2000.0, rate_hz=5.0, sensor_rate_hz=50.0, seed=0,
                motion=None):
    """Plan a route and drive it: return ``(route, camera Trajectory, sensor Trajectory)``.

    The camera samples are at ``rate_hz``, the odometry/IMU samples at ``sensor_rate_hz``,
    both from t = 0 on the same clock. Deterministic for a given ``seed``.
    """
    if not (np.isfinite(rate_hz) and rate_hz > 0):
        raise InputError(f'camera rate {rate_hz} Hz must be positive')
    if not (np.isfinite(sensor_rate_hz) and sensor_rate_hz > 0):
        raise InputError(f'sensor rate {sensor_rate_hz} Hz must be positive')
    rng = np.random.default_rng([int(seed), 0xD21])
    route = plan_route(roads, length_m, rng)
    profile = simulate_motion(route, rng, motion)
    return route, profile.sample_rate(rate_hz), profile.sample_rate(sensor_rate_hz)


def write_drive_bag_for_roads(roads, frame, render, out_path, length_m=2000.0, rate_hz=5.0,
                              seed=0, progress=True, image_size=None, odom_noise=None,
                              imu_noise=None, storage='mcap', *, sensor_rate_hz=50.0,
                              fov_deg=90.0, camera_height_m=1.8, include_tf=False,
                              overwrite=False, motion=None, write_raw=True):
    """Drive along ``roads`` and write the drive rosbag2 (see :data:`DRIVE_TOPICS`).

    ``roads``: ENU polylines (metres) or objects with ``.polyline`` and ``.width_m``;
    ``frame``: the :class:`~geozoom_ros.geo.LocalFrame` of those coordinates; ``render``: a
    callable ``render(east_m, north_m, heading_deg, pitch_deg=0.0, roll_deg=0.0) -> (H, W, 3)
    uint8 RGB`` with a compass ``heading_deg`` (0 = north, clockwise) and pitch up-positive,
    for a camera looking along the vehicle heading. ``image_size`` (width, height) resizes the
    frames. ``fov_deg`` and ``camera_height_m`` are recorded (CameraInfo, custom data); the
    render callable must use the same values. ``write_raw=False`` leaves out the raw Image
    topic (about 0.6 MB per 512x384 frame; the JPEG topic is about 20x smaller). Returns the
    bag directory ``out_path``.
    """
    import cv2

    route, cam, sensors = drive_truth(roads, length_m, rate_hz, sensor_rate_hz, seed, motion)
    noise_rng = np.random.default_rng([int(seed), 0x0D0])
    odom = simulate_odometry(sensors, noise_rng, odom_noise)
    imu = simulate_imu(sensors, noise_rng, imu_noise)
    roll, pitch = body_attitude(cam)
    heading = cam.heading_deg

    def frames():
        for i in range(len(cam)):
            # Positive body pitch is nose down (REP-103); the camera's pitch is up-positive.
            rgb = render(float(cam.east[i]), float(cam.north[i]), float(heading[i]),
                         pitch_deg=-math.degrees(pitch[i]), roll_deg=math.degrees(roll[i]))
            if image_size is not None and (rgb.shape[1], rgb.shape[0]) != tuple(image_size):
                rgb = cv2.resize(rgb, tuple(int(v) for v in image_size),
                                 interpolation=cv2.INTER_AREA)
            yield rgb

    config = DriveConfig(length_m=float(length_m), rate_hz=float(rate_hz),
                         sensor_rate_hz=float(sensor_rate_hz), seed=int(seed),
                         camera_height_m=float(camera_height_m), fov_deg=float(fov_deg),
                         storage=storage)
    custom = {'config': asdict(config),
              'odom_noise': asdict(odom_noise or OdomNoise()),
              'imu_noise': asdict(imu_noise or ImuNoise()),
              'route_length_m': route_length_m(route)}
    return write_drive_bag_from_poses(
        out_path, frame, cam.t, cam.positions(), frames(), fov_deg=fov_deg, odom=odom,
        imu=imu, storage=storage, include_tf=include_tf, altitude_m=frame.h0,
        custom_data=custom, progress=progress, overwrite=overwrite, write_raw=write_raw)


def write_drive_bag(city, renderer, out_path, length_m=2000.0, rate_hz=5.0, seed=0,
                    progress=True, image_size=None, odom_noise=None, imu_noise=None,
                    storage='mcap', *, sensor_rate_hz=50.0, camera_height_m=1.8,
                    fov_deg=90.0, include_tf=False, overwrite=False, lighting=None,
                    write_raw=True):
    """Drive through ``city`` and write the drive rosbag2 (see :data:`DRIVE_TOPICS`).

    ``city`` needs ``.roads`` (with ``.polyline`` in ENU metres and ``.width_m``) and
    ``.frame`` (:class:`~geozoom_ros.geo.LocalFrame`); ``renderer`` needs
    ``render(east_m, north_m, height_m, heading_deg, fov_deg, pitch_deg=, roll_deg=,
    lighting=) -> (H, W, 3) uint8 RGB`` with a compass ``heading_deg``. The camera looks
    along the vehicle heading at ``camera_height_m`` metres with ``fov_deg`` horizontal field
    of view; the vehicle's pitch and roll move it. ``image_size`` (width, height) is passed
    to the renderer as ``size=``. Returns the bag directory ``out_path``
    (a rosbag2 folder holding ``<name>.mcap`` or ``<name>.db3`` and ``metadata.yaml``).
    """
    extra = {} if image_size is None else {'size': tuple(int(v) for v in image_size)}

    def render(east, north, heading_deg, pitch_deg=0.0, roll_deg=0.0):
        return renderer.render(east, north, camera_height_m, heading_deg, fov_deg,
                               pitch_deg=pitch_deg, roll_deg=roll_deg, lighting=lighting,
                               **extra)

    return write_drive_bag_for_roads(
        city.roads, city.frame, render, out_path, length_m=length_m, rate_hz=rate_hz,
        seed=seed, progress=progress, image_size=image_size, odom_noise=odom_noise,
        imu_noise=imu_noise, storage=storage, sensor_rate_hz=sensor_rate_hz, fov_deg=fov_deg,
        camera_height_m=camera_height_m, include_tf=include_tf, overwrite=overwrite,
        write_raw=write_raw)
