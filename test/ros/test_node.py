"""geozoom_node with real rclpy, a real small map bundle and a real (untrained) policy.

The node runs in-process and as a subprocess, fed by `geozoom replay` of a synthetic drive
bag; its fixes must equal the offline localizer's on the same frames. Bad frames, priors and
headings must give warnings and diagnostics, never a dead node; bad start-up must give one
line and exit status 2.
"""

import math
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.geo import geodesic_distance_m, LocalFrame
from geozoom_ros.ros import gating as G
from geozoom_ros.ros import node as N
from geozoom_ros.ros.conversions import compressed_msg_to_rgb, image_msg_to_rgb
from geozoom_ros.ros.params import NodeParams
from geozoom_ros.search import Prior
from geozoom_ros.world import drive as D

pytest.importorskip('torch')

TIMES = np.arange(6) * 0.3  # seconds between camera frames of the test drive
FIX, POSE, DIAG, HYP = '/t/fix', '/t/pose', '/t/diagnostics', '/t/hypotheses'


# --------------------------------------------------------------------------------------------
# Fixtures: a real map, models, a drive bag; a recorder node

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from geozoom_ros.ros.bench import make_small_world
    return make_small_world(tmp_path_factory.mktemp('node_world'))


@pytest.fixture(scope='module')
def heading_world(tmp_path_factory, world):
    """A policy that takes the camera heading, and its bundle over the same map."""
    import torch

    from geozoom_ros.bundle import build_bundle
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.policy import ZoomPolicy

    folder = tmp_path_factory.mktemp('heading_world')
    torch.manual_seed(1)
    cfg = PolicyConfig(embed_dim=16, grid_k=2, steps=2, root_zoom=16, view_size=32,
                       ground_size=(32, 32), decoder_layers=1, decoder_heads=2, dropout=0.0,
                       heading_input=True)
    model = save_model(ZoomPolicy(cfg, pretrained=False).eval(), folder / 'model')
    bundle = build_bundle(world['map'], model, folder / 'bundle', batch_size=16, progress=False)
    return {'model': model, 'bundle': bundle}


@pytest.fixture(scope='module')
def localizer(world):
    from geozoom_ros.localizer import GeoZoomLocalizer
    return GeoZoomLocalizer(world['bundle'], world['model'], beam_width=4)


def _frames(n, seed=5, size=(64, 48)):
    import cv2
    rng = np.random.default_rng(seed)
    return [cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), size,
                       interpolation=cv2.INTER_LINEAR) for _ in range(n)]


@pytest.fixture(scope='module')
def drive(tmp_path_factory, world):
    """A drive bag over the map (raw and JPEG frames) and the frames as decoded offline."""
    from rosbags.highlevel import AnyReader

    w, s, e, n = world['bounds']
    frame = LocalFrame(0.5 * (s + n), 0.5 * (w + e))
    enu = np.stack([TIMES * 10.0 - 25.0, TIMES * 5.0], axis=1)
    bag = D.write_drive_bag_from_poses(tmp_path_factory.mktemp('drive') / 'drive', frame,
                                       TIMES, enu, _frames(len(TIMES)), fov_deg=90.0,
                                       progress=False)
    frames = {'raw': {}, 'compressed': {}}
    with AnyReader([bag]) as reader:
        for conn, ts, raw in reader.messages():
            if conn.topic == D.TOPIC_IMAGE:
                frames['raw'][ts] = image_msg_to_rgb(reader.deserialize(raw, conn.msgtype))
            elif conn.topic == D.TOPIC_IMAGE_COMPRESSED:
                frames['compressed'][ts] = compressed_msg_to_rgb(
                    reader.deserialize(raw, conn.msgtype))
    assert len(frames['raw']) == len(TIMES) == len(frames['compressed'])
    return {'bag': bag, 'frames': frames}


class Recorder:
    """Subscribes (reliable QoS) to the node's outputs and keeps every message."""

    def __init__(self, context, name='geozoom_test_recorder'):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import NavSatFix

        self.node = rclpy.create_node(name, context=context)
        self.msgs = {FIX: [], POSE: [], DIAG: [], HYP: []}
        self._lock = threading.Lock()
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        for topic, cls in ((FIX, NavSatFix), (POSE, PoseWithCovarianceStamped),
                           (DIAG, DiagnosticArray), (HYP, PoseArray)):
            self.node.create_subscription(cls, topic, lambda m, t=topic: self._on(t, m), qos)

    def _on(self, topic, msg):
        with self._lock:
            self.msgs[topic].append(msg)

    def get(self, topic):
        with self._lock:
            return list(self.msgs[topic])

    def last_diag(self):
        diags = self.get(DIAG)
        if not diags:
            return None
        st = diags[-1].status[0]
        return st, {kv.key: kv.value for kv in st.values}


def _params(world, **kw):
    base = dict(bundle=str(world['bundle']), model=str(world['model']), beam_width=4,
                fix_topic=FIX, pose_topic=POSE, diagnostics_topic=DIAG, hypotheses_topic=HYP,
                max_rate_hz=50.0, min_confidence=0.3, diagnostics_period_s=0.2,
                warn_throttle_s=0.0, image_topic='/t/image_raw')
    base.update(kw)
    return NodeParams(**base)


def _image_msg(rgb, stamp_ns, encoding='rgb8'):
    from sensor_msgs.msg import Image
    from geozoom_ros.ros.conversions import rgb_to_image_msg_fields
    f = rgb_to_image_msg_fields(rgb, encoding)
    msg = Image(height=f['height'], width=f['width'], encoding=f['encoding'], step=f['step'],
                data=f['data'].tobytes())
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = 'camera'
    return msg


def _reliable(depth=20):
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def _check_fixes(fixes, frames, loc, params, stamps=None):
    """Every fix equals the offline localizer's on the frame of the same stamp."""
    from sensor_msgs.msg import NavSatFix, NavSatStatus

    for msg in fixes:
        ts = G.stamp_ns(msg.header.stamp)
        assert ts in frames, f'fix stamp {ts} is no frame of the bag'
        want = loc.localize(frames[ts])
        assert msg.header.frame_id == params.fix_frame_id
        assert abs(msg.latitude - want.lat) < 1e-6 and abs(msg.longitude - want.lon) < 1e-6
        cov = np.array(msg.position_covariance).reshape(3, 3)
        np.testing.assert_allclose(cov[:2, :2], G.safe_covariance_en(want.cov_en), rtol=1e-6)
        assert np.all(np.isfinite(cov)) and np.all(np.diag(cov) > 0)
        assert np.all(np.linalg.eigvalsh(cov) > 0)
        assert msg.position_covariance_type == NavSatFix.COVARIANCE_TYPE_APPROXIMATED
        assert msg.altitude == params.fix_altitude_m and math.isfinite(msg.altitude)
        gated_in = want.confidence >= params.min_confidence and want.sigma_m <= \
            params.max_sigma_m
        assert msg.status.status == (NavSatStatus.STATUS_FIX if gated_in else
                                     NavSatStatus.STATUS_NO_FIX)
        assert msg.status.service == params.fix_service
    if stamps is not None:
        assert sorted(G.stamp_ns(m.header.stamp) for m in fixes) == sorted(stamps)


# --------------------------------------------------------------------------------------------
# ROS-free pieces

def test_heading_from_an_enu_quaternion():
    # ENU yaw 0 faces east (compass 90); yaw +90 deg faces north (compass 0).
    for yaw_deg, compass in ((0.0, 90.0), (90.0, 0.0), (180.0, 270.0), (-90.0, 180.0),
                             (30.0, 60.0)):
        q = D.quaternion_from_rpy(0.0, 0.0, math.radians(yaw_deg))
        yaw = G.yaw_from_quaternion(*q)
        assert math.isclose(G.compass_heading_deg(yaw), compass, abs_tol=1e-9) or \
            math.isclose(G.compass_heading_deg(yaw), compass + 360.0, abs_tol=1e-9)
    assert G.compass_heading_deg(0.0, offset_deg=-100.0) == pytest.approx(350.0)
    with pytest.raises(InputError, match='norm'):
        G.yaw_from_quaternion(0, 0, 0, 0)
    with pytest.raises(InputError, match='finite'):
        G.yaw_from_quaternion(0, 0, float('nan'), 1)


def test_latest_frame_keeps_the_newest_and_counts_drops():
    slot = G.LatestFrame()
    assert slot.take(0.0) is None
    assert not slot.put(1)
    assert slot.put(2) and slot.put(3)
    assert slot.pending() == 1 and slot.replaced == 2
    assert slot.take(0.0) == 3 and slot.take(0.0) is None
    t = threading.Timer(0.05, slot.put, args=(4,))
    t.start()
    assert slot.take(2.0) == 4
    t.join()


def test_throttle_and_prior_monitor():
    now = [0.0]
    th = G.Throttle(5.0, clock=lambda: now[0])
    assert th.ready('image') == (True, 0)
    assert th.ready('image') == (False, 0) and th.ready('image') == (False, 0)
    assert th.ready('prior') == (True, 0)
    now[0] = 5.5
    assert th.ready('image') == (True, 2)
    m = G.PriorMonitor(3)
    assert not m.observe(False) and not m.observe(False)
    assert not m.observe(True)  # an agreeing fix resets the streak
    assert [m.observe(False) for _ in range(3)] == [False, False, True]
    assert m.whole_map and m.fallbacks == 1
    assert not m.observe(False) and m.observe(True) and not m.whole_map


def test_covariance_is_floored_symmetric_and_finite():
    c = G.safe_covariance_en([[0.0, 0.0], [1e-9, -5.0]])
    assert np.allclose(c, c.T) and np.all(np.linalg.eigvalsh(c) >= G.MIN_VARIANCE_M2 - 1e-9)
    big = np.array([[400.0, 30.0], [30.0, 100.0]])
    np.testing.assert_allclose(G.safe_covariance_en(big), big)
    with pytest.raises(InputError):
        G.safe_covariance_en([[np.nan, 0], [0, 1]])
    r = G.rotate_cov(np.diag([100.0, 1.0]), math.pi / 2)
    np.testing.assert_allclose(r, np.diag([1.0, 100.0]), atol=1e-9)


def test_priors_from_odometry_and_navsatfix():
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import NavSatFix

    frame = LocalFrame(47.37, 8.54)
    odom = Odometry()
    odom.pose.pose.position.x = 100.0
    cov = np.zeros((6, 6))
    cov[0, 0], cov[1, 1] = 400.0, 25.0
    odom.pose.covariance = cov.ravel().tolist()
    # The map x axis points north (datum yaw +90 deg): x = 100 m is 100 m north of the datum.
    prior = G.prior_from_odometry(odom, frame, math.pi / 2, 1.0)
    e, n, _ = frame.to_enu(prior.lat, prior.lon)
    assert abs(e) < 1e-6 and n == pytest.approx(100.0, abs=1e-6)
    np.testing.assert_allclose(prior.cov_en, np.diag([25.0, 400.0]), atol=1e-9)
    floored = G.prior_from_odometry(odom, frame, 0.0, 30.0)
    np.testing.assert_allclose(floored.cov_en, np.diag([900.0, 900.0]), atol=1e-6)
    odom.pose.pose.position.y = float('nan')
    with pytest.raises(InputError, match='not finite'):
        G.prior_from_odometry(odom, frame, 0.0, 1.0)

    fix = NavSatFix(latitude=47.37, longitude=8.54)
    fix.status.status = 0
    fix.position_covariance_type = NavSatFix.COVARIANCE_TYPE_UNKNOWN
    p = G.prior_from_navsatfix(fix, 15.0)
    np.testing.assert_allclose(p.cov_en, np.eye(2) * 225.0)
    fix.status.status = -1
    with pytest.raises(InputError, match='NO_FIX'):
        G.prior_from_navsatfix(fix, 15.0)
    prior = Prior.from_sigma(47.37, 8.54, 10.0)
    lat, lon, _ = frame.to_latlon(30.0, 40.0)
    assert G.mahalanobis(prior, lat, lon) == pytest.approx(5.0, rel=1e-3)


def test_converter_choice():
    import logging
    log = logging.getLogger('test')
    try:
        import cv_bridge  # noqa: F401
        have_bridge = True
    except ImportError:
        have_bridge = False
    convert, name = N._make_converter('own', 'raw', log)
    assert name == 'own' and convert is image_msg_to_rgb
    convert, name = N._make_converter('own', 'compressed', log)
    assert convert is compressed_msg_to_rgb
    convert, name = N._make_converter('auto', 'raw', log)
    assert name == ('cv_bridge' if have_bridge else 'own')
    if not have_bridge:
        with pytest.raises(ConfigError, match='image_converter=cv_bridge.*own'):
            N._make_converter('cv_bridge', 'raw', log)


# --------------------------------------------------------------------------------------------
# Parameters on a real node

def test_parameters_are_declared_with_descriptors_and_checked(world, localizer,
                                                              rclpy_context):
    from rclpy.parameter import Parameter

    node = N.GeoZoomNode(_params(world), localizer=localizer, context=rclpy_context,
                         parameter_overrides=[Parameter('beam_width', value=6)])
    try:
        assert node.params.beam_width == 6 and node.params.fix_topic == FIX
        d = node.describe_parameter('max_rate_hz')
        assert 'Hz' in d.description and d.read_only
        d = node.describe_parameter('prior_source')
        assert 'odometry' in d.description
        assert node.describe_parameter('beam_width').integer_range[0].from_value == 1
    finally:
        node.destroy_node()
    cases = [
        (Parameter('max_rate_hz', value=5), 'max_rate_hz.*floating-point'),
        (Parameter('beam_width', value=0), 'beam_width=0 must be >= 1'),
        (Parameter('prior_source', value='gps'), 'prior_source.*not one of'),
        (Parameter('max_sigma_m', value=-1.0), 'max_sigma_m=-1.0 must be > 0'),
        (Parameter('beam_widht', value=3), 'unknown parameter.*beam_widht'),
        (Parameter('image_topic', value='cam era'), 'image_topic=.*not a valid ROS topic'),
    ]
    for override, match in cases:
        with pytest.raises(ConfigError, match=match) as exc:
            N.GeoZoomNode(_params(world), localizer=localizer, context=rclpy_context,
                          parameter_overrides=[override])
        assert '\n' not in str(exc.value)


def test_the_gate_takes_the_threshold_calibrated_for_the_search(world, rclpy_context):
    from geozoom_ros import calibration as C
    from geozoom_ros.localizer import GeoZoomLocalizer

    cal = C.Calibration({'zoom-beam': C.CovarianceModel(1.0, 5.0, 0.0)}, None, {},
                        gates={'zoom-beam': {'min_confidence': 0.05}})
    loc = GeoZoomLocalizer(world['bundle'], world['model'], beam_width=4, calibration=cal)
    fixes = [loc.localize(rgb) for rgb in _frames(6, seed=2)]
    for source, want, origin in (('calibration', 0.05, 'calibration'),
                                 ('parameters', 0.3, 'min_confidence')):
        node = N.GeoZoomNode(_params(world, gate_source=source), localizer=loc,
                             context=rclpy_context)
        try:
            values = {kv.key: kv.value for kv in node.diagnostics().values}
            assert values['gate_min_confidence'] == f'{want:g} ({origin})'
            for fix in fixes:
                assert fix.method == 'zoom-beam'
                passed = node._gate.passes(fix.confidence, fix.cov_en, fix.method)[0]
                assert passed == (fix.confidence >= want and fix.sigma_m <= 150.0)
        finally:
            node.destroy_node()


# --------------------------------------------------------------------------------------------
# The node in-process, fed by the replay of a drive bag

def test_in_process_fixes_match_the_offline_localizer(world, localizer, drive, rclpy_context,
                                                      spinner, wait_until):
    from geozoom_ros.ros.replay import replay_bag

    w, s, e, n = world['bounds']
    params = _params(world, image_topic=D.TOPIC_IMAGE, datum_source='parameters',
                     datum_latitude=s, datum_longitude=w, datum_yaw=0.3)
    rec = Recorder(rclpy_context)
    node = N.GeoZoomNode(params, context=rclpy_context)  # loads bundle and model itself
    spinner.add(node)
    spinner.add(rec.node)
    spinner.start()
    try:
        stats = replay_bag(drive['bag'], context=rclpy_context, topics=[D.TOPIC_IMAGE],
                           wait_for_subscribers_s=5.0, progress=False)
        assert stats.messages == len(TIMES)
        # On a loaded machine a frame may still be in progress when the next one arrives:
        # newest wins, and the older one is counted as dropped.
        assert wait_until(lambda: node.stats['frames_processed'] + node.stats['frames_dropped']
                          == len(TIMES), 10.0), node.stats
        assert wait_until(lambda: len(rec.get(FIX)) == node.stats['frames_processed'], 5.0)
        fixes = rec.get(FIX)
        frames = drive['frames']['raw']
        assert len(fixes) >= len(TIMES) - 2 and node.stats['frames_received'] == len(TIMES)
        dropped = node.stats['frames_dropped']
        _check_fixes(fixes, frames, localizer, params,
                     stamps=list(frames) if dropped == 0 else None)
        # Poses for gated-in fixes only, same stamps, in the map frame: ENU about the datum
        # turned by datum_yaw.
        from sensor_msgs.msg import NavSatStatus
        good = {G.stamp_ns(m.header.stamp): m for m in fixes
                if m.status.status == NavSatStatus.STATUS_FIX}
        assert wait_until(lambda: len(rec.get(POSE)) >= len(good), 5.0)
        poses = rec.get(POSE)
        assert len(poses) == len(good)
        for pose in poses:
            fix = good[G.stamp_ns(pose.header.stamp)]
            assert pose.header.frame_id == 'map'
            e, n, _ = LocalFrame(s, w).to_enu(fix.latitude, fix.longitude)
            c, si = math.cos(0.3), math.sin(0.3)
            assert pose.pose.pose.position.x == pytest.approx(c * e + si * n, abs=1e-6)
            assert pose.pose.pose.position.y == pytest.approx(-si * e + c * n, abs=1e-6)
            cov = np.array(pose.pose.covariance).reshape(6, 6)
            want = G.rotate_cov(np.array(fix.position_covariance).reshape(3, 3)[:2, :2], -0.3)
            np.testing.assert_allclose(cov[:2, :2], want, rtol=1e-9)
            assert np.all(np.diag(cov) > 0)
        assert wait_until(lambda: len(rec.get(HYP)) == len(fixes), 5.0)
        assert all(1 <= len(h.poses) <= 4 for h in rec.get(HYP))
        assert wait_until(lambda: rec.last_diag() and
                          rec.last_diag()[1]['frames_processed'] == str(len(fixes)), 5.0)
        st, values = rec.last_diag()
        assert values['frames_received'] == str(len(TIMES))
        assert values['frames_dropped'] == str(dropped)
        # 'auto' picks the fastest installed backend; the diagnostics name the one in use.
        assert values['backend'] == localizer.backend.name and values['prior_mode'] == 'off'
        assert values['backend'] == 'onnxruntime'
        assert values['heading_mode'].startswith('unused')
        # The test model has no calibration.json: the gate is min_confidence.
        assert values['gate_min_confidence'] == '0.3 (min_confidence)'
        assert float(values['processing_latency_ms_p95']) > 0
        assert float(values['input_rate_hz']) == pytest.approx(1 / 0.3, rel=0.5)
        assert values['queue_pending'] == '0'
    finally:
        spinner.stop()
        node.destroy_node()


def test_newest_frame_wins_and_the_rate_is_capped(world, localizer, rclpy_context, spinner,
                                                  wait_until):
    import rclpy

    params = _params(world, max_rate_hz=4.0, pose_frame='utm', pose_frame_id='utm',
                     min_confidence=0.0)
    rec = Recorder(rclpy_context)
    node = spinner.add(N.GeoZoomNode(params, localizer=localizer, context=rclpy_context))
    spinner.add(rec.node)
    cam = spinner.add(rclpy.create_node('camera', context=rclpy_context))
    pub = cam.create_publisher(__import__('sensor_msgs.msg', fromlist=['Image']).Image,
                               params.image_topic, _reliable())
    spinner.start()
    try:
        assert wait_until(lambda: pub.get_subscription_count() > 0, 5.0)
        frames = _frames(40, seed=9)
        t0 = time.monotonic()
        for i, rgb in enumerate(frames):  # 40 frames at 40 Hz, 1 s
            pub.publish(_image_msg(rgb, 1_000_000_000 + i))
            time.sleep(max(0.0, t0 + (i + 1) / 40.0 - time.monotonic()))
        assert wait_until(lambda: node.stats['frames_received'] == 40, 5.0)
        time.sleep(0.6)
        s = dict(node.stats)
        fixes = rec.get(FIX)
        # About 4 Hz for 1 s plus the first frame; every other frame was replaced.
        assert 2 <= s['frames_processed'] <= 7, s
        assert s['frames_processed'] + s['frames_dropped'] == 40
        assert len(fixes) == s['frames_processed'] and node._slot.pending() == 0
        # The last frame always wins.
        assert max(G.stamp_ns(m.header.stamp) for m in fixes) == 1_000_000_000 + 39
        _check_fixes(fixes, {1_000_000_000 + i: f for i, f in enumerate(frames)}, localizer,
                     params)
        # UTM poses in the datum's zone (every fix passes the gate here).
        from geozoom_ros.geo import latlon_to_utm
        assert wait_until(lambda: len(rec.get(POSE)) == len(fixes), 5.0)
        by_stamp = {G.stamp_ns(m.header.stamp): m for m in fixes}
        for pose in rec.get(POSE):
            fix = by_stamp[G.stamp_ns(pose.header.stamp)]
            east, north, epsg = latlon_to_utm(fix.latitude, fix.longitude)
            assert epsg == 32632 and pose.header.frame_id == 'utm'
            assert pose.pose.pose.position.x == pytest.approx(east, abs=1e-6)
            assert pose.pose.pose.position.y == pytest.approx(north, abs=1e-6)
    finally:
        spinner.stop()
        node.destroy_node()


def _bad_images():
    from sensor_msgs.msg import CompressedImage, Image
    ok = _frames(1, seed=3)[0]
    h, w = ok.shape[:2]
    data = ok.tobytes()
    return [
        ('unknown encoding', Image(height=h, width=w, encoding='bayer_xyz9', step=w * 3,
                                   data=data)),
        ('empty', Image(height=0, width=0, encoding='rgb8', step=0, data=b'')),
        ('odd-sized yuv422', Image(height=h, width=w - 1, encoding='yuv422',
                                   step=(w - 1) * 2, data=data)),
        ('step smaller than a row', Image(height=h, width=w, encoding='rgb8', step=w * 3 - 5,
                                          data=data)),
        ('data shorter than step x height', Image(height=h, width=w, encoding='rgb8',
                                                  step=w * 3 + 8, data=data)),
        ('tiny 4x4', Image(height=4, width=4, encoding='rgb8', step=12, data=bytes(48))),
    ], CompressedImage


def test_bad_frames_warn_count_and_the_node_keeps_running(world, localizer, rclpy_context,
                                                          spinner, wait_until):
    import cv2
    import rclpy
    from sensor_msgs.msg import CompressedImage, Image

    raw_params = _params(world)
    jpg_params = _params(world, image_topic='/t/image_raw/compressed',
                         image_transport='compressed', fix_topic='/t/fix_jpeg',
                         diagnostics_topic='/t/diag_jpeg', pose_topic='', hypotheses_topic='')
    rec = Recorder(rclpy_context)
    raw = spinner.add(N.GeoZoomNode(raw_params, localizer=localizer, context=rclpy_context))
    jpg = spinner.add(N.GeoZoomNode(jpg_params, localizer=localizer, context=rclpy_context,
                                    node_name='geozoom_node_jpeg'))
    spinner.add(rec.node)
    cam = spinner.add(rclpy.create_node('camera', context=rclpy_context))
    pub = cam.create_publisher(Image, raw_params.image_topic, _reliable())
    cpub = cam.create_publisher(CompressedImage, jpg_params.image_topic, _reliable())
    spinner.start()
    try:
        assert wait_until(lambda: pub.get_subscription_count() and
                          cpub.get_subscription_count(), 5.0)
        bad, _ = _bad_images()
        for i, (_, msg) in enumerate(bad):
            msg.header.stamp.sec = 100 + i
            pub.publish(msg)
            # One at a time, so that newest-wins replaces none of them.
            assert wait_until(lambda: raw.stats['frames_processed'] == i + 1, 5.0)
        good = _frames(1, seed=4)[0]
        ok, enc = cv2.imencode('.jpg', good)
        corrupt = enc.tobytes()[:200] + bytes(300) + b'\xff\xd9'
        for i, data in enumerate([corrupt, enc.tobytes()[:len(enc) // 2], b'not an image']):
            msg = CompressedImage(format='jpeg', data=data)
            msg.header.stamp.sec = 200 + i
            cpub.publish(msg)
            assert wait_until(lambda: jpg.stats['frames_processed'] == i + 1, 5.0)
        assert rec.get(FIX) == []
        assert raw.stats['bad_images'] == len(bad) and jpg.stats['bad_images'] == 3
        assert wait_until(lambda: rec.last_diag() and
                          rec.last_diag()[1]['bad_images'] == str(len(bad)), 5.0)
        st, values = rec.last_diag()
        assert 'tiny' in values['last_image_problem'] or '8x8' in values['last_image_problem']
        # Both nodes still localise a good frame.
        pub.publish(_image_msg(good, 300_000_000_000))
        jmsg = CompressedImage(format='jpeg', data=enc.tobytes())
        jmsg.header.stamp.sec = 301
        cpub.publish(jmsg)
        assert wait_until(lambda: len(rec.get(FIX)) == 1, 5.0)
        _check_fixes(rec.get(FIX), {300_000_000_000: good}, localizer, raw_params)
        assert wait_until(lambda: jpg.stats['fixes_published'] + jpg.stats['fixes_gated_out']
                          == 1, 5.0)
    finally:
        spinner.stop()
        raw.destroy_node()
        jpg.destroy_node()


def test_bad_priors_give_no_fix_then_whole_map_search(world, localizer, rclpy_context,
                                                      spinner, wait_until):
    import rclpy
    from sensor_msgs.msg import Image, NavSatFix

    params = _params(world, prior_source='navsatfix', prior_topic='/t/prior',
                     prior_disagree_count=2, prior_max_age_s=30.0, min_confidence=0.0)
    rec = Recorder(rclpy_context)
    node = spinner.add(N.GeoZoomNode(params, localizer=localizer, context=rclpy_context))
    spinner.add(rec.node)
    src = spinner.add(rclpy.create_node('sources', context=rclpy_context))
    pub = src.create_publisher(Image, params.image_topic, _reliable())
    ppub = src.create_publisher(NavSatFix, '/t/prior', _reliable())
    spinner.start()
    frames = _frames(6, seed=21)
    sent = [0]

    def frame(i):
        pub.publish(_image_msg(frames[i], (500 + i) * 1_000_000_000))
        sent[0] += 1
        assert wait_until(lambda: node.stats['frames_processed'] == sent[0], 5.0)

    def prior(lat, lon, sigma=20.0):
        m = NavSatFix(latitude=lat, longitude=lon)
        m.status.status = m.status.STATUS_FIX
        m.position_covariance = [sigma ** 2, 0.0, 0.0, 0.0, sigma ** 2, 0.0, 0.0, 0.0, 1.0]
        m.position_covariance_type = NavSatFix.COVARIANCE_TYPE_DIAGONAL_KNOWN
        before = node._prior
        ppub.publish(m)
        assert wait_until(lambda: node._prior is not before, 5.0)

    try:
        assert wait_until(lambda: pub.get_subscription_count() and
                          ppub.get_subscription_count(), 5.0)
        prior(float('nan'), 8.54)                       # NaN prior: no fix
        frame(0)
        assert rec.get(FIX) == [] and node.stats['bad_priors'] == 1
        assert node.stats['frames_no_fix_prior'] == 1
        assert wait_until(lambda: rec.last_diag() and
                          'invalid prior' in rec.last_diag()[1]['prior_mode'], 5.0)
        assert rec.last_diag()[0].level == rec.last_diag()[0].WARN
        prior(0.0, 0.0)                                 # outside the map: no fix, twice ...
        frame(1)
        frame(2)
        assert rec.get(FIX) == []
        frame(3)                                        # ... then whole-map search
        assert wait_until(lambda: len(rec.get(FIX)) == 1, 5.0)
        want = localizer.localize(frames[3])
        got = rec.get(FIX)[0]
        assert abs(got.latitude - want.lat) < 1e-6 and abs(got.longitude - want.lon) < 1e-6
        assert node.stats['prior_fallbacks'] == 1
        assert wait_until(lambda: 'disagreed' in rec.last_diag()[1]['prior_mode'], 5.0)
        assert rec.last_diag()[1]['prior_fallbacks'] == '1'
        # A valid prior on the map whose 3-sigma region holds the whole-map fix: agreement
        # switches prior search back on, and fixes stay inside the prior's region.
        w, s, e, n = world['bounds']
        c_lat, c_lon = 0.5 * (s + n), 0.5 * (w + e)
        prior(want.lat, want.lon, 30.0)
        frame(4)
        assert not node._monitor.whole_map
        prior(c_lat, c_lon, 25.0)
        frame(5)
        assert wait_until(lambda: len(rec.get(FIX)) == 3, 5.0)
        last = rec.get(FIX)[-1]
        want = localizer.localize(frames[5], prior=Prior.from_sigma(c_lat, c_lon, 25.0))
        assert abs(last.latitude - want.lat) < 1e-6 and abs(last.longitude - want.lon) < 1e-6
        assert geodesic_distance_m(last.latitude, last.longitude, c_lat, c_lon) < \
            3 * 25.0 * 1.5 + 120.0
    finally:
        spinner.stop()
        node.destroy_node()


def test_heading_from_imu_and_heading_free_mode(world, heading_world, rclpy_context, spinner,
                                                wait_until):
    import rclpy
    from sensor_msgs.msg import Image, Imu

    from geozoom_ros.localizer import GeoZoomLocalizer

    loc = GeoZoomLocalizer(heading_world['bundle'], heading_world['model'], beam_width=4)
    assert loc.heading_input
    params = _params(world, bundle=str(heading_world['bundle']),
                     model=str(heading_world['model']), heading_source='imu',
                     heading_topic='/t/imu', heading_max_age_s=30.0)
    rec = Recorder(rclpy_context)
    node = spinner.add(N.GeoZoomNode(params, localizer=loc, context=rclpy_context))
    spinner.add(rec.node)
    src = spinner.add(rclpy.create_node('sources', context=rclpy_context))
    pub = src.create_publisher(Image, params.image_topic, _reliable())
    ipub = src.create_publisher(Imu, '/t/imu', _reliable())
    spinner.start()
    frames = _frames(3, seed=33)
    try:
        assert wait_until(lambda: pub.get_subscription_count() and
                          ipub.get_subscription_count(), 5.0)
        # No IMU yet: heading-free mode (the policy's NaN heading), said in the diagnostics.
        pub.publish(_image_msg(frames[0], 700_000_000_000))
        assert wait_until(lambda: node.stats['frames_processed'] == 1, 5.0)
        try:
            g = loc.backend.encode_ground([frames[0]], headings=[None])[0]
        except InputError:  # this backend cannot leave the heading out: no fix, said so
            g = None
        if g is not None:
            assert wait_until(lambda: len(rec.get(FIX)) == 1, 5.0)
            want = loc.search(g)
            fix = rec.get(FIX)[0]
            assert abs(fix.latitude - want.estimate[0]) < 1e-6
            assert abs(fix.longitude - want.estimate[1]) < 1e-6
        else:
            assert rec.get(FIX) == [] and node.stats['bad_headings'] == 1
        assert wait_until(lambda: rec.last_diag() and
                          'heading-free' in rec.last_diag()[1]['heading_mode'], 5.0)
        assert rec.last_diag()[0].level == rec.last_diag()[0].WARN
        n0 = len(rec.get(FIX))
        # IMU facing north-east (ENU yaw 45 deg): compass heading 45.
        imu = Imu()
        q = D.quaternion_from_rpy(0.0, 0.0, math.radians(45.0))
        imu.orientation.x, imu.orientation.y, imu.orientation.z, imu.orientation.w = q
        ipub.publish(imu)
        assert wait_until(lambda: node._heading is not None, 5.0)
        assert node._heading.value == pytest.approx(45.0)
        for i in (1, 2):
            pub.publish(_image_msg(frames[i], 700_000_000_000 + i))
            assert wait_until(lambda: len(rec.get(FIX)) == n0 + i, 5.0)
            want = loc.localize(frames[i], heading_deg=45.0)
            fix = rec.get(FIX)[-1]
            assert abs(fix.latitude - want.lat) < 1e-6 and abs(fix.longitude - want.lon) < 1e-6
        assert wait_until(lambda: rec.last_diag()[1]['heading_mode'] == 'imu', 5.0)
        # An IMU without orientation is a bad heading: warned and counted.
        bad = Imu()
        bad.orientation_covariance[0] = -1.0
        before = node.stats['bad_headings']
        ipub.publish(bad)
        assert wait_until(lambda: node.stats['bad_headings'] == before + 1, 5.0)
    finally:
        spinner.stop()
        node.destroy_node()


# --------------------------------------------------------------------------------------------
# The node as a subprocess (python -m geozoom_ros.ros.node), fed by `geozoom replay`

def _write_params(path, values):
    import yaml
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
    return path


def test_subprocess_node_with_geozoom_replay_and_clean_exit(world, localizer, drive, tmp_path,
                                                            rclpy_context, spinner, processes,
                                                            wait_until):
    params = _params(world, image_topic=D.TOPIC_IMAGE_COMPRESSED,
                     image_transport='compressed', image_qos='reliable', fix_frame_id='gps',
                     fix_altitude_m=408.5)
    yaml_path = _write_params(tmp_path / 'localize.yaml', params.to_dict())
    node = processes.start([sys.executable, '-m', 'geozoom_ros.ros.node', '--ros-args',
                            '--params-file', str(yaml_path)], name='node')
    rec = Recorder(rclpy_context)
    spinner.add(rec.node)
    spinner.start()
    # The node is up when its diagnostics arrive.
    up = wait_until(lambda: rec.get(DIAG) or node.poll() is not None, 60.0)
    assert up and node.poll() is None, processes.output(node)
    replay = processes.geozoom('replay', drive['bag'], '--topics', D.TOPIC_IMAGE_COMPRESSED,
                               '--wait-for-subscribers', '10', '--quiet', name='replay')
    assert processes.wait(replay, 60) == 0, processes.output(replay)

    def done():  # every frame processed or replaced by a newer one, said in diagnostics
        v = rec.last_diag()[1]
        return int(v['frames_processed']) + int(v['frames_dropped']) == len(TIMES) and \
            int(v['frames_processed']) == len(rec.get(FIX))

    assert wait_until(done, 15.0), (rec.last_diag(), processes.output(node))
    values = rec.last_diag()[1]
    assert values['frames_received'] == str(len(TIMES))
    fixes = rec.get(FIX)
    assert len(fixes) >= len(TIMES) - 2
    frames = drive['frames']['compressed']
    _check_fixes(fixes, frames, localizer, params,
                 stamps=list(frames) if values['frames_dropped'] == '0' else None)
    node.send_signal(signal.SIGINT)
    assert processes.wait(node, 15) == 0
    out = processes.output(node)
    assert 'Traceback' not in out and 'localizing /camera/image_raw/compressed' in out


def test_bad_start_up_exits_2_with_one_line_and_sigterm_is_clean(
        world, heading_world, tmp_path, processes, wait_until):
    good = _params(world).to_dict()
    # A good node, started alongside the bad ones, must stop cleanly on SIGTERM.
    node = processes.start([sys.executable, '-m', 'geozoom_ros.ros.node', '--ros-args',
                            '--params-file', str(_write_params(tmp_path / 'good.yaml', good))],
                           name='node')
    cases = {
        'missing bundle': ({**good, 'bundle': str(tmp_path / 'nope')}, 'does not exist'),
        'map/model mismatch': ({**good, 'model': str(heading_world['model'])},
                               'was built for model'),
        'unknown key': ({**good, 'beam_witdh': 3}, 'unknown parameter.*beam_witdh'),
        'bad value': ({**good, 'min_confidence': 1.5}, 'min_confidence=1.5 must be <= 1.0'),
        'no bundle': ({**good, 'bundle': ''}, 'bundle is not set'),
    }
    procs = {}
    for name, (values, _) in cases.items():
        path = _write_params(tmp_path / f'{name.replace(" ", "_").replace("/", "_")}.yaml',
                             values)
        procs[name] = processes.start([sys.executable, '-m', 'geozoom_ros.ros.node',
                                       '--ros-args', '--params-file', str(path)], name='bad')
    import re
    for name, (_, pattern) in cases.items():
        code = processes.wait(procs[name], 60)
        out = processes.output(procs[name])
        lines = [line for line in out.splitlines() if 'geozoom_node: error:' in line]
        assert code == 2, (name, out)
        assert len(lines) == 1 and re.search(pattern, lines[0]), (name, out)
        assert 'Traceback' not in out, (name, out)
    assert wait_until(lambda: 'localizing' in processes.output(node) or
                      node.poll() is not None, 60.0), processes.output(node)
    node.send_signal(signal.SIGTERM)
    assert processes.wait(node, 15) == 0
    assert 'Traceback' not in processes.output(node)


def test_no_stray_processes_are_left(processes):
    """Every child process the node tests started has exited (conftest kills the rest)."""
    me = os.getpid()
    children = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != 'Z':
            try:
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    cmdline = f.read().replace(b'\0', b' ').decode(errors='replace')
            except OSError:
                continue
            # multiprocessing's resource tracker lives as long as the test process by design.
            if 'multiprocessing.resource_tracker' not in cmdline:
                children.append(cmdline)
    assert children == []
