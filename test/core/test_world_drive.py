"""The synthetic drive: route planning, motion, odometry/IMU noise and the rosbag2 it writes."""

import math
from types import SimpleNamespace

from frames import pattern_frame
import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from geozoom_ros.errors import InputError
from geozoom_ros.geo import LocalFrame
from geozoom_ros.ros.conversions import compressed_msg_to_rgb, image_msg_to_rgb
from geozoom_ros.world import drive as D

DEAD_ENDS = np.array([[480.0, 200.0], [150.0, 60.0]])
FRAME = LocalFrame(48.137, 11.575)


def _grid_roads():
    """A 400 m x 400 m street grid, a dead-end spur, a T-road drawn 0.8 m short, an island."""
    roads = []
    for k in range(5):
        roads.append(SimpleNamespace(polyline=np.array([[0, k * 100.0], [200, k * 100.0],
                                                        [400, k * 100.0]]), width_m=8.0))
        roads.append(SimpleNamespace(polyline=np.array([[k * 100.0, 0], [k * 100.0, 400.0]]),
                                     width_m=10.0))
    roads.append(SimpleNamespace(polyline=np.array([[400.0, 200.0], [480.0, 200.0]]),
                                 width_m=6.0))
    roads.append(SimpleNamespace(polyline=np.array([[150.0, 99.2], [150.0, 60.0]]), width_m=6.0))
    roads.append(SimpleNamespace(polyline=np.array([[1000.0, 1000.0], [1100.0, 1000.0]]),
                                 width_m=6.0))
    return roads


ROADS = _grid_roads()


def _carriageway_excess(points, roads):
    """Distance (m) by which each point lies outside every road's carriageway (<= 0: on it)."""
    excess = np.full(len(points), np.inf)
    for r in roads:
        line = r.polyline
        for a, b in zip(line[:-1], line[1:]):
            ab = b - a
            t = np.clip((points - a) @ ab / (ab @ ab), 0, 1)
            d = np.linalg.norm(a + t[:, None] * ab - points, axis=1)
            excess = np.minimum(excess, d - r.width_m / 2)
    return excess


def test_road_graph_snaps_intersections_and_short_t_junctions():
    g = D.build_road_graph(ROADS)
    comps = g.components()
    assert [len(c) for c in comps] == [28, 2]  # 25 crossings + spur end + T end + T joint
    joint = np.argmin(np.linalg.norm(g.nodes - [150.0, 100.0], axis=1))
    assert np.allclose(g.nodes[joint], [150.0, 100.0], atol=0.5)
    assert g.degree(joint) == 3
    centre = np.argmin(np.linalg.norm(g.nodes - [200.0, 200.0], axis=1))
    assert g.degree(centre) == 4
    total = sum(e.length_m for e in g.edges)
    assert total == pytest.approx(10 * 400 + 80 + 39.2 + 100, abs=2.0)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_route_is_continuous_on_the_right_lane_and_long_enough(seed):
    route = D.plan_route(ROADS, 2000.0, np.random.default_rng(seed))
    steps = np.linalg.norm(np.diff(route, axis=0), axis=1)
    assert D.route_length_m(route) >= 1999.0
    assert steps.max() <= 1.0 + 1e-6 and steps.min() > 0.5
    assert np.all(_carriageway_excess(route, ROADS[:-1]) <= 0)  # on the road everywhere
    # Away from intersections the vehicle keeps to the right of the centre line.
    d = np.gradient(route, axis=0)
    near_x = np.abs(route[:, 0, None] - np.arange(0, 401, 100)).min(axis=1) < 12
    near_y = np.abs(route[:, 1, None] - np.arange(0, 401, 100)).min(axis=1) < 12
    grid_only = (route[:, 0] < 400) & (np.abs(route[:, 0] - 150) > 6)
    far = ~(near_x & near_y) & grid_only  # on a grid street, away from its crossings
    lane = []
    for p, t in zip(route[far], d[far]):
        right = np.array([t[1], -t[0]]) / np.linalg.norm(t)
        ref_x = np.round(p[0] / 100) * 100
        ref_y = np.round(p[1] / 100) * 100
        if abs(p[0] - ref_x) < abs(p[1] - ref_y):
            lane.append((p[0] - ref_x) * right[0])
        else:
            lane.append((p[1] - ref_y) * right[1])
    lane = np.asarray(lane)
    assert len(lane) > 500
    assert np.median(lane) == pytest.approx(2.25, abs=0.5)  # width/4 of 8-10 m roads
    assert np.mean(lane > 0) > 0.95


def test_route_turns_at_intersections_and_turns_back_only_at_dead_ends():
    turns = 0
    for seed in range(4):
        route = D.plan_route(ROADS, 2000.0, np.random.default_rng(seed))
        h = np.arctan2(*np.diff(route, axis=0).T[::-1])
        change = np.abs(np.angle(np.exp(1j * (h[20:] - h[:-20]))))  # over 20 m
        turns += np.sum((change[1:] > np.radians(80)) & (change[:-1] <= np.radians(80)))
        reversals = np.nonzero(change > np.radians(170))[0] + 10
        for i in reversals:
            assert np.linalg.norm(DEAD_ENDS - route[i], axis=1).min() < 15.0
    assert turns >= 8


def test_route_on_a_generated_city_keeps_to_its_lane():
    from geozoom_ros.world.city import make_city

    city = make_city(2, 600.0, (48.137, 11.575))
    route = D.plan_route(city.roads, 1500.0, np.random.default_rng(5))
    assert np.all(_carriageway_excess(route, city.roads) <= 0)
    h = np.arctan2(*np.diff(route, axis=0).T[::-1])
    assert np.degrees(np.abs(np.angle(np.exp(1j * np.diff(h))))).max() < 35  # no cusps


def test_route_stays_on_the_largest_network_and_bad_input():
    route = D.plan_route(ROADS, 500.0, np.random.default_rng(7))
    assert np.all(route < 500)  # never on the island road at (1000, 1000)
    with pytest.raises(InputError):
        D.plan_route([], 100.0, np.random.default_rng(0))
    with pytest.raises(InputError):
        D.plan_route(ROADS, 0.0, np.random.default_rng(0))
    with pytest.raises(InputError):
        D.plan_route([np.array([[0.0, 0.0], [np.nan, 1.0]])], 10.0, np.random.default_rng(0))


def test_motion_speeds_accelerations_and_turn_slowdowns():
    route, cam, sens = D.drive_truth(ROADS, 2000.0, rate_hz=5.0, sensor_rate_hz=50.0, seed=3)
    p = D.MotionParams()
    assert np.all(np.diff(cam.t) == pytest.approx(0.2))
    assert sens.speed.min() >= p.turn_speed_floor_mps - 1e-9
    assert sens.speed.max() <= p.max_speed_mps + 1e-9
    assert np.percentile(sens.speed, 90) > 8.0  # mostly cruising
    assert np.abs(sens.accel).max() < 2.5
    jerk = np.diff(sens.accel) / np.diff(sens.t)
    assert np.abs(jerk).max() < 3.0  # smooth, no bang-bang steps
    turning = np.abs(sens.yaw_rate) > 0.3
    assert sens.speed[turning].mean() < sens.speed[~turning].mean() - 2.0
    # Positions advance by speed x dt and heading follows the path.
    step = np.linalg.norm(np.diff(sens.positions(), axis=0), axis=1)
    v_mid = 0.5 * (sens.speed[1:] + sens.speed[:-1])
    assert np.allclose(step, v_mid * 0.02, atol=0.02)
    d = np.diff(sens.positions(), axis=0)
    yaw_path = np.arctan2(d[:, 1], d[:, 0])
    err = np.angle(np.exp(1j * (yaw_path - sens.yaw[:-1])))
    assert np.percentile(np.abs(err), 95) < np.radians(10)
    # Same seed, same drive.
    route2, cam2, _ = D.drive_truth(ROADS, 2000.0, rate_hz=5.0, sensor_rate_hz=50.0, seed=3)
    np.testing.assert_array_equal(route, route2)
    np.testing.assert_array_equal(cam.east, cam2.east)


def test_heading_conventions():
    assert D.yaw_to_heading_deg(0.0) == pytest.approx(90.0)  # east
    assert D.yaw_to_heading_deg(math.pi / 2) == pytest.approx(0.0)  # north
    assert D.yaw_to_heading_deg(math.pi) == pytest.approx(270.0)
    assert D.heading_deg_to_yaw(180.0) == pytest.approx(-math.pi / 2)
    q = D.quaternion_from_rpy(0.0, 0.0, math.pi / 2)
    assert np.allclose(q, [0, 0, math.sqrt(0.5), math.sqrt(0.5)])


def test_odometry_drift_is_realistic():
    _, _, sens = D.drive_truth(ROADS, 2000.0, sensor_rate_hz=50.0, seed=1)
    finals, maxes = [], []
    for s in range(6):
        odom = D.simulate_odometry(sens, np.random.default_rng(s))
        err = np.linalg.norm(odom.to_enu() - sens.positions(), axis=1)
        finals.append(err[-1] / 2000.0)
        maxes.append(err.max() / 2000.0)
        assert err[0] == 0.0
        # The reported covariance grows with distance and stays positive.
        assert np.all(np.diff(odom.pose_cov[:, 0, 0]) >= 0)
        assert odom.pose_cov[-1, 0, 0] > odom.pose_cov[0, 0, 0] > 0
    assert 0.003 < np.median(finals) < 0.08  # a few percent of the distance, not zero
    assert 0.01 < np.median(maxes) < 0.12
    perfect = D.OdomNoise(speed_scale_sigma=0, yaw_rate_scale_sigma=0, yaw_rate_bias_sigma=0,
                          yaw_rate_bias_walk=0, speed_noise=0, yaw_rate_noise=0)
    odom = D.simulate_odometry(sens, np.random.default_rng(0), perfect)
    err = np.linalg.norm(odom.to_enu() - sens.positions(), axis=1)
    # Only the truth's own smoothing of the heading in the tightest turns remains: a small
    # fraction of the drift that the noise model adds.
    assert err.max() < 0.0025 * 2000.0 < 0.2 * np.median(maxes) * 2000.0
    assert odom.x[-1] != 0.0


def test_imu_is_earth_referenced_with_bias_and_gravity():
    _, _, sens = D.drive_truth(ROADS, 600.0, sensor_rate_hz=50.0, seed=2)
    imu = D.simulate_imu(sens, np.random.default_rng(0))
    err = np.degrees(np.angle(np.exp(1j * (imu.yaw - sens.yaw))))
    assert 0.1 < np.std(err) < 5.0 and np.abs(err).max() < 12.0
    # The yaw error is slowly varying (bias), not only white noise.
    smooth = np.convolve(err, np.ones(250) / 250, mode='valid')
    assert np.ptp(smooth) > 0.2 or abs(smooth.mean()) > 0.2
    assert np.mean(imu.linear_acceleration[:, 2]) == pytest.approx(D.GRAVITY, abs=0.2)
    gz_err = imu.angular_velocity[:, 2] - sens.yaw_rate
    assert np.std(gz_err) < 0.02
    lat = sens.speed * sens.yaw_rate
    assert np.corrcoef(imu.linear_acceleration[:, 1], lat)[0, 1] > 0.9
    assert np.all(imu.orientation_cov[:, 2, 2] > 0)


_render = pattern_frame


@pytest.fixture(scope='module')
def small_bag(tmp_path_factory):
    out = tmp_path_factory.mktemp('bag') / 'drive'
    path = D.write_drive_bag_for_roads(ROADS, FRAME, _render, out, length_m=150.0, rate_hz=5.0,
                                       seed=4, progress=False, sensor_rate_hz=20.0)
    return path


def _read_all(path):
    msgs = {}
    with AnyReader([path]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        for conn, ts, raw in reader.messages():
            msgs.setdefault(conn.topic, []).append((ts, raw, reader.deserialize(raw,
                                                                                conn.msgtype)))
    return types, msgs


def test_bag_reads_back_with_rosbags(small_bag):
    assert (small_bag / 'metadata.yaml').exists() and (small_bag / 'drive.mcap').exists()
    assert not [p for p in small_bag.parent.iterdir() if p.name.startswith('.')]
    types, msgs = _read_all(small_bag)
    expected = {k: v for k, v in D.DRIVE_TOPICS.items() if k != D.TOPIC_TF}
    assert types == expected
    _, cam, sens = D.drive_truth(ROADS, 150.0, 5.0, 20.0, seed=4)
    n_cam, n_sens = len(cam), len(sens)
    counts = {t: len(m) for t, m in msgs.items()}
    assert counts == {D.TOPIC_IMAGE: n_cam, D.TOPIC_IMAGE_COMPRESSED: n_cam,
                      D.TOPIC_CAMERA_INFO: n_cam, D.TOPIC_GPS_TRUTH: n_cam,
                      D.TOPIC_ODOM: n_sens, D.TOPIC_IMU: n_sens}
    assert n_cam > 50
    for topic, items in msgs.items():
        stamps = np.array([ts for ts, _, _ in items])
        assert np.all(np.diff(stamps) > 0), topic
        heads = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, m in items]
        assert heads == list(stamps), topic
    # Images: raw equals the render at the true pose, JPEG close to it.
    for i in (0, n_cam // 2, n_cam - 1):
        ref = _render(cam.east[i], cam.north[i], cam.heading_deg[i])
        _, _, img = msgs[D.TOPIC_IMAGE][i]
        assert img.encoding == 'rgb8' and img.header.frame_id == D.FRAME_CAMERA
        np.testing.assert_array_equal(image_msg_to_rgb(img), ref)
        _, _, comp = msgs[D.TOPIC_IMAGE_COMPRESSED][i]
        assert 'jpeg' in comp.format
        assert np.abs(compressed_msg_to_rgb(comp).astype(int) - ref).mean() < 20
    info = msgs[D.TOPIC_CAMERA_INFO][0][2]
    assert (info.width, info.height) == (32, 24)
    fx = info.k[0]
    assert math.degrees(2 * math.atan(16 / fx)) == pytest.approx(90.0)
    assert info.k[2] == 16 and info.k[5] == 12 and info.p[10] == 1.0
    # Odometry: odom -> base_link, starts at the origin, covariance set.
    odom0 = msgs[D.TOPIC_ODOM][0][2]
    assert (odom0.header.frame_id, odom0.child_frame_id) == ('odom', 'base_link')
    assert odom0.pose.pose.position.x == 0.0 and odom0.pose.covariance[0] > 0
    last = msgs[D.TOPIC_ODOM][-1][2].pose.pose.position
    assert math.hypot(last.x, last.y) > 10
    # IMU: earth-referenced yaw near the true ENU yaw.
    for k in (0, n_sens // 2):
        q = msgs[D.TOPIC_IMU][k][2].orientation
        yaw = math.atan2(2 * (q.w * q.z + q.x * q.y), 1 - 2 * (q.y ** 2 + q.z ** 2))
        assert abs(math.degrees(np.angle(np.exp(1j * (yaw - sens.yaw[k]))))) < 10
        assert msgs[D.TOPIC_IMU][k][2].header.frame_id == 'base_link'


def test_navsatfix_truth_matches_the_planned_route(small_bag):
    _, msgs = _read_all(small_bag)
    route, cam, _ = D.drive_truth(ROADS, 150.0, 5.0, 20.0, seed=4)
    fixes = [m for _, _, m in msgs[D.TOPIC_GPS_TRUTH]]
    lat = np.array([f.latitude for f in fixes])
    lon = np.array([f.longitude for f in fixes])
    e, n, _ = FRAME.to_enu(lat, lon, np.zeros(len(lat)))
    assert np.allclose(e, cam.east, atol=1e-3) and np.allclose(n, cam.north, atol=1e-3)
    d = np.linalg.norm(route[None, :, :] - np.stack([e, n], 1)[:, None, :], axis=2).min(axis=1)
    assert d.max() < 0.6  # on the route (1 m samples)
    assert all(f.status.status >= 0 and np.all(np.isfinite(f.position_covariance))
               for f in fixes)


def test_every_message_deserialises_with_rclpy(small_bag):
    from rclpy.serialization import deserialize_message
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image, Imu, NavSatFix

    classes = {D.TOPIC_IMAGE: Image, D.TOPIC_IMAGE_COMPRESSED: CompressedImage,
               D.TOPIC_CAMERA_INFO: CameraInfo, D.TOPIC_GPS_TRUTH: NavSatFix,
               D.TOPIC_ODOM: Odometry, D.TOPIC_IMU: Imu}
    _, msgs = _read_all(small_bag)
    for topic, cls in classes.items():
        for _, raw, ref in msgs[topic][:3] + msgs[topic][-2:]:
            msg = deserialize_message(bytes(raw), cls)
            assert msg.header.stamp.sec == ref.header.stamp.sec
            assert msg.header.stamp.nanosec == ref.header.stamp.nanosec
    _, raw, ref = msgs[D.TOPIC_IMAGE][1]
    img = deserialize_message(bytes(raw), Image)
    np.testing.assert_array_equal(image_msg_to_rgb(img), image_msg_to_rgb(ref))
    _, raw, ref = msgs[D.TOPIC_GPS_TRUTH][5]
    fix = deserialize_message(bytes(raw), NavSatFix)
    assert (fix.latitude, fix.longitude) == (ref.latitude, ref.longitude)
    _, raw, ref = msgs[D.TOPIC_IMU][7]
    imu = deserialize_message(bytes(raw), Imu)
    assert imu.orientation.z == ref.orientation.z
    assert list(imu.orientation_covariance) == list(ref.orientation_covariance)


def test_sqlite3_bag_and_custom_data(tmp_path):
    out = D.write_drive_bag_for_roads(ROADS, FRAME, _render, tmp_path / 'd3', length_m=30.0,
                                      seed=1, progress=False, storage='sqlite3',
                                      sensor_rate_hz=10.0, include_tf=True,
                                      image_size=(16, 12))
    assert (out / 'd3.db3').exists()
    types, msgs = _read_all(out)
    assert types[D.TOPIC_TF] == 'tf2_msgs/msg/TFMessage'
    assert len(msgs[D.TOPIC_TF]) == len(msgs[D.TOPIC_ODOM])
    assert msgs[D.TOPIC_IMAGE][0][2].width == 16
    assert msgs[D.TOPIC_CAMERA_INFO][0][2].width == 16
    meta = D.read_drive_metadata(out)
    assert meta['config']['seed'] == 1 and meta['frame']['lat0'] == FRAME.lat0
    assert meta['topics'][D.TOPIC_TF] == 'tf2_msgs/msg/TFMessage'


def test_from_poses_and_bad_arguments(tmp_path):
    t = np.arange(4) * 0.5
    enu = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], float)
    imgs = [np.full((8, 10, 3), i * 40, np.uint8) for i in range(4)]
    out = D.write_drive_bag_from_poses(tmp_path / 'p', FRAME, t, enu, iter(imgs),
                                       progress=False, write_raw=False)
    types, msgs = _read_all(out)
    assert set(types) == {D.TOPIC_IMAGE_COMPRESSED, D.TOPIC_GPS_TRUTH}
    named = D.write_drive_bag_from_poses(tmp_path / 'drive.mcap', FRAME, t, enu, imgs,
                                         progress=False)
    assert sorted(p.name for p in named.iterdir()) == ['drive.mcap', 'metadata.yaml']
    assert len(_read_all(named)[1][D.TOPIC_GPS_TRUTH]) == 4
    assert len(msgs[D.TOPIC_GPS_TRUTH]) == 4

    with pytest.raises(InputError, match='exists'):
        D.write_drive_bag_from_poses(out, FRAME, t, enu, iter(imgs), progress=False)
    with pytest.raises(InputError, match='only 2 images'):
        D.write_drive_bag_from_poses(tmp_path / 'short', FRAME, t, enu, iter(imgs[:2]),
                                     progress=False)
    assert not (tmp_path / 'short').exists()
    with pytest.raises(InputError, match='storage'):
        D.write_drive_bag_from_poses(tmp_path / 'x', FRAME, t, enu, imgs, storage='rosbag1')
    with pytest.raises(InputError, match='increase'):
        D.write_drive_bag_from_poses(tmp_path / 'x', FRAME, t[::-1], enu, imgs)
    with pytest.raises(InputError):
        D.write_drive_bag_from_poses(tmp_path / 'x', FRAME, t, enu[:2], imgs)
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(InputError, match='writable'):
        D.write_drive_bag_from_poses(blocker / 'bag', FRAME, t, enu, imgs, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['drive.mcap', 'file', 'p']
    # Overwrite replaces the bag whole.
    D.write_drive_bag_from_poses(out, FRAME, t[:2], enu[:2], imgs[:2], progress=False,
                                 overwrite=True)
    _, msgs = _read_all(out)
    assert len(msgs[D.TOPIC_GPS_TRUTH]) == 2


def test_write_drive_bag_uses_the_city_renderer(tmp_path):
    calls = []

    class Renderer:
        def render(self, east_m, north_m, height_m, heading_deg, fov_deg, pitch_deg=0.0,
                   roll_deg=0.0, lighting=None, size=None):
            calls.append((height_m, fov_deg, pitch_deg, roll_deg, size))
            return _render(east_m, north_m, heading_deg)

    city = SimpleNamespace(roads=ROADS, frame=FRAME)
    out = D.write_drive_bag(city, Renderer(), tmp_path / 'city', length_m=20.0, seed=0,
                            progress=False, camera_height_m=2.0, fov_deg=80.0,
                            image_size=(32, 24))
    types, msgs = _read_all(out)
    assert len(calls) == len(msgs[D.TOPIC_IMAGE]) > 5
    assert all(c[0] == 2.0 and c[1] == 80.0 and c[4] == (32, 24) for c in calls)
    assert max(abs(c[2]) for c in calls) < 3.0 and max(abs(c[3]) for c in calls) < 3.0
    info = msgs[D.TOPIC_CAMERA_INFO][0][2]
    assert math.degrees(2 * math.atan(16 / info.k[0])) == pytest.approx(80.0)
