"""`geozoom eval-bag` and its engine: stamps, ground-truth matching, bad bags, end to end."""

import json
import math
import shutil

from frames import pattern_frame
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores

from geozoom_ros.cli import main
from geozoom_ros.errors import InputError
from geozoom_ros.eval import bag as B
from geozoom_ros.geo import geodesic_distance_m, LocalFrame
from geozoom_ros.world import drive as D

TS = get_typestore(Stores.ROS2_KILTED)
T = TS.types
T0 = 1_700_000_000_000_000_000
FRAME = LocalFrame(47.37, 8.54)
ROADS = [np.array([[-120.0, -120.0], [120.0, -120.0], [120.0, 120.0], [-120.0, 120.0],
                   [-120.0, -120.0]])]


# --------------------------------------------------------------------------------------------
# helpers

def _header(ns, frame='base_link'):
    return T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](
        sec=int(ns // 10**9), nanosec=int(ns % 10**9)), frame_id=frame)


def _navsat(ns, lat, lon, status=0):
    return T['sensor_msgs/msg/NavSatFix'](
        header=_header(ns), status=T['sensor_msgs/msg/NavSatStatus'](status=status, service=1),
        latitude=lat, longitude=lon, altitude=0.0, position_covariance=np.zeros(9),
        position_covariance_type=0)


def _image(ns, value=90):
    data = np.full((16, 16, 3), value, np.uint8)
    return T['sensor_msgs/msg/Image'](header=_header(ns, 'camera'), height=16, width=16,
                                      encoding='rgb8', is_bigendian=0, step=48,
                                      data=data.reshape(-1))


def _write_bag(path, messages, storage='mcap', topics=None):
    """messages: [(topic, msgtype, bag time ns, message)]; topics: extra empty connections."""
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns = {}
        for topic, msgtype in list(topics or []) + [(m[0], m[1]) for m in messages]:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=TS)
        for topic, msgtype, ns, msg in messages:
            w.write(conns[topic], ns, TS.serialize_cdr(msg, msgtype))
    return path


_render = pattern_frame


@pytest.fixture(scope='module')
def drive_bag(tmp_path_factory):
    out = tmp_path_factory.mktemp('evalbag') / 'drive'
    return D.write_drive_bag_for_roads(ROADS, FRAME, _render, out, length_m=300.0, rate_hz=2.0,
                                       seed=2, progress=False, sensor_rate_hz=20.0)


# --------------------------------------------------------------------------------------------
# stamps and matching

def test_clean_stamps_sorts_and_drops_duplicates():
    order, rep = B.clean_stamps([3, 1, 2, 2, 5])
    assert order.tolist() == [1, 2, 0, 4]
    assert (rep.messages, rep.out_of_order, rep.duplicates) == (5, 3, 1)
    order, rep = B.clean_stamps([])
    assert order.size == 0 and rep.messages == 0


def test_interpolation_between_two_fixes():
    t = np.array([0.0, 1.0, 5.0])
    v = np.array([[0.0, 0.0], [10.0, 20.0], [10.0, 20.0]])
    out = B.interpolate_track(t, v, [0.25, 1.0, 0.0, 3.0, -0.01, -1.0, 5.04, 6.0],
                              max_gap_s=2.0, edge_s=0.05)
    np.testing.assert_allclose(out[0], [2.5, 5.0])
    np.testing.assert_allclose(out[1], [10.0, 20.0])
    np.testing.assert_allclose(out[2], [0.0, 0.0])
    assert np.isnan(out[3]).all()  # between samples 4 s apart: a gap, no truth
    np.testing.assert_allclose(out[4], [0.0, 0.0])  # just before the first sample
    assert np.isnan(out[5]).all() and np.isnan(out[7]).all()
    np.testing.assert_allclose(out[6], [10.0, 20.0])


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_out_of_order_and_duplicate_truth_is_sorted_and_interpolated(tmp_path, storage):
    lat = [47.37, 47.3701, 47.3702, 47.3703]
    msgs = []
    # Truth written out of order (2, 0, 1, 3) with a duplicate stamp of fix 1 (other values).
    for i in (2, 0, 1, 3):
        ns = T0 + i * 10**9
        msgs.append(('/gps/fix_truth', 'sensor_msgs/msg/NavSatFix', ns,
                     _navsat(ns, lat[i], 8.54)))
        if i == 1:
            msgs.append(('/gps/fix_truth', 'sensor_msgs/msg/NavSatFix', ns + 1,
                         _navsat(ns, 10.0, 10.0)))
    msgs.append(('/gps/fix_truth', 'sensor_msgs/msg/NavSatFix', T0 + 5 * 10**9,
                 _navsat(T0 + 5 * 10**9, 0.0, 0.0, status=-1)))  # NO_FIX: dropped
    for k in range(4):
        ns = T0 + int((k + 0.5) * 10**9)
        msgs.append(('/camera/image_raw', 'sensor_msgs/msg/Image', ns, _image(ns)))
    msgs.append(('/chatter', 'std_msgs/msg/String', T0, T['std_msgs/msg/String'](data='hi')))
    # Recorded in this order (the bag's receive times increase down the list).
    msgs = [(tp, mt, T0 + k * 10**6, m) for k, (tp, mt, _, m) in enumerate(msgs)]
    path = _write_bag(tmp_path / 'b', msgs, storage)
    bag = B.read_bag(path, quiet=True)
    assert bag.image_topic == '/camera/image_raw' and bag.n_images == 4
    gt = bag.gt
    rep = bag.stamps['/gps/fix_truth']
    assert rep.out_of_order >= 2 and rep.duplicates == 1 and gt.dropped == 1
    np.testing.assert_allclose(gt.lat, lat)  # sorted, the duplicate's first message kept
    np.testing.assert_allclose(gt.t, [0, 1, 2, 3])
    assert bag.odom is None and any('odometry' in w for w in bag.warnings)
    # A frame half-way between fixes 0 and 1 gets the midpoint.
    la, lo, enu = gt.at([0.5])
    assert la[0] == pytest.approx(47.37005, abs=1e-9) and lo[0] == pytest.approx(8.54)
    assert enu[0, 1] == pytest.approx(geodesic_distance_m(47.37, 8.54, 47.37005, 8.54),
                                      abs=0.05)
    frames = list(bag.images())
    assert [f.index for f in frames] == [0, 1, 2, 3] and frames[0].rgb.shape == (16, 16, 3)
    assert [f.t for f in bag.images(every=2)] == pytest.approx([0.5, 2.5])


def test_out_of_order_frames_are_sorted_in_the_evaluation(drive_bag):
    bag = B.read_bag(drive_bag, quiet=True)
    t = bag.gt.t[:6]
    frames = []
    for i in (3, 1, 2, 0, 5, 5, 4):  # out of order, one duplicate
        lat, lon = bag.gt.lat[i], bag.gt.lon[i]
        frames.append(B.FrameFix(i, bag.t0_ns + int(round(t[i] * 1e9)), float(t[i]), 'fix',
                                 lat, lon, np.eye(2) * 100.0, 10.0, 0.9, True, 5.0))
    ev = B.evaluate(bag, frames, quiet=True)
    assert [f.index for f in ev.frames] == [0, 1, 2, 3, 4, 5]
    st = ev.metrics['frames']['stamps']
    assert st['duplicates'] == 1 and st['out_of_order'] >= 3
    np.testing.assert_allclose(ev.error_m, 0.0, atol=0.05)


# --------------------------------------------------------------------------------------------
# bad bags

def test_missing_image_topic_empty_and_truncated_bags_are_one_line(tmp_path, drive_bag):
    with pytest.raises(InputError, match="no topic '/cam/x'.*pass --image-topic") as exc:
        B.read_bag(drive_bag, image_topic='/cam/x')
    assert '\n' not in str(exc.value)
    with pytest.raises(InputError, match='is nav_msgs/msg/Odometry, not'):
        B.read_bag(drive_bag, image_topic='/odom')
    # A bag without any image topic.
    only_gt = _write_bag(tmp_path / 'gt_only', [(
        '/gps/fix_truth', 'sensor_msgs/msg/NavSatFix', T0, _navsat(T0, 47.37, 8.54))])
    with pytest.raises(InputError, match='holds no sensor_msgs/Image or CompressedImage'):
        B.read_bag(only_gt)
    # An empty recording: the topics exist, no messages.
    empty = _write_bag(tmp_path / 'empty', [], topics=[
        ('/camera/image_raw', 'sensor_msgs/msg/Image'),
        ('/gps/fix_truth', 'sensor_msgs/msg/NavSatFix')])
    with pytest.raises(InputError, match='holds no messages on /camera/image_raw'):
        B.read_bag(empty)
    # Truncated storage files.
    for storage in ('mcap', 'sqlite3'):
        src = tmp_path / f'whole_{storage}'
        msgs = [('/camera/image_raw', 'sensor_msgs/msg/Image', T0 + k * 10**8,
                 _image(T0 + k * 10**8, k)) for k in range(40)]
        _write_bag(src, msgs, storage)
        f = next(p for p in src.iterdir() if p.suffix in ('.mcap', '.db3'))
        size = f.stat().st_size
        with open(f, 'r+b') as fh:
            fh.truncate(size // 2)
        with pytest.raises(InputError, match='truncated or corrupt') as exc:
            bag = B.read_bag(src)
            list(bag.images())
        assert '\n' not in str(exc.value) and str(src) in str(exc.value)
    with pytest.raises(InputError, match='does not exist'):
        B.read_bag(tmp_path / 'nope')
    (tmp_path / 'nometa').mkdir()
    with pytest.raises(InputError, match='no metadata.yaml'):
        B.read_bag(tmp_path / 'nometa')


def test_missing_ground_truth_warns_and_skips_its_metrics(tmp_path, drive_bag, capsys):
    bag = B.read_bag(drive_bag, gt_topic='/no/truth')
    assert 'no ground-truth topic /no/truth' in capsys.readouterr().err
    assert bag.gt is None and bag.frame is not None  # the drive's recorded datum
    frames = [B.FrameFix(i, bag.t0_ns + int(k * 5e8), k * 0.5, 'fix', 47.37, 8.54,
                         np.eye(2) * 400.0, 20.0, 0.8, True, 3.0)
              for i, k in enumerate(range(10))]
    ev = B.evaluate(bag, frames, quiet=True)
    assert ev.metrics['fixes'] is None and ev.metrics['ground_truth'] is None
    fu = ev.metrics['fusion']
    assert fu is not None and 'fused' not in fu and fu['fixes_offered'] == 10
    assert any('ground-truth' in w for w in ev.metrics['warnings'])


def test_fix_metrics_against_hand_computed_errors(drive_bag):
    bag = B.read_bag(drive_bag, quiet=True)
    frames = []
    for i in range(0, len(bag.gt), 2):
        e, n = bag.gt.enu[i] + [30.0, 40.0]  # every fix 50 m off
        lat, lon, _ = bag.frame.to_latlon(e, n, 0.0)
        frames.append(B.FrameFix(i, bag.t0_ns + int(round(bag.gt.t[i] * 1e9)),
                                 float(bag.gt.t[i]), 'fix', float(lat), float(lon),
                                 np.eye(2) * 2500.0, 50.0, 0.9, True, 7.0))
    frames.append(B.FrameFix(999, frames[-1].stamp_ns + 1000, frames[-1].t + 1e-6, 'no_cell'))
    ev = B.evaluate(bag, frames, quiet=True)
    fx = ev.metrics['fixes']
    assert fx['n'] == len(frames) and fx['fixes'] == len(frames) - 1
    assert fx['median_error_m'] == pytest.approx(50.0, abs=0.3)
    assert fx['recall@25m'] == 0.0 and fx['recall@100m'] == pytest.approx(
        (len(frames) - 1) / len(frames))
    # NEES of a 50 m error with a 50 m sigma per axis: 50^2 / 2500 = 1.
    assert fx['nees_mean'] == pytest.approx(1.0, rel=0.02)
    assert ev.metrics['latency_ms']['p50'] == pytest.approx(7.0)
    fu = ev.metrics['fusion']
    assert fu['start_pose_from'].startswith('the drive record')
    for key in ('fused', 'odometry_only', 'ekf_without_fixes'):
        assert fu[key]['ate_rmse_m'] >= 0 and fu[key]['samples'] > 10


# --------------------------------------------------------------------------------------------
# end to end, with a real (untrained) model and map bundle

@pytest.fixture(scope='module')
def small_world(tmp_path_factory):
    pytest.importorskip('torch')
    from geozoom_ros.ros.bench import make_small_world
    return make_small_world(tmp_path_factory.mktemp('world'))


def test_eval_bag_command_writes_the_report(small_world, drive_bag, tmp_path, capsys):
    out = tmp_path / 'report'
    rc = main(['eval-bag', str(drive_bag), '--bundle', str(small_world['bundle']), '--model',
               str(small_world['model']), '--every', '2', '--no-progress', '--threads', '1',
               '-o', str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert 'fused: ATE RMSE' in text and str(out / 'report.md') in text
    m = json.loads((out / 'metrics.json').read_text())
    n_images = m['bag']['images']
    assert m['frames']['evaluated'] == math.ceil(n_images / 2)
    assert m['fixes']['n'] == m['frames']['evaluated']
    assert m['fusion']['fixes_offered'] == m['frames']['published']
    assert (m['fusion']['fixes_fused'] + m['fusion']['fixes_rejected_by_gate'] +
            m['fusion']['fixes_before_start']) == m['fusion']['fixes_offered']
    assert m['map_background'] == str(small_world['map'])
    for name in ('error_cdf.png', 'error_time.png', 'trajectory_map.png', 'latency.png'):
        assert (out / name).stat().st_size > 10_000
        assert f']({name})' in (out / 'report.md').read_text()
    assert not [p for p in out.iterdir() if p.name.startswith('.')]


def test_eval_bag_compressed_topic_and_fused_prior(small_world, drive_bag):
    from geozoom_ros.localizer import GeoZoomLocalizer

    loc = GeoZoomLocalizer(small_world['bundle'], small_world['model'], beam_width=2)
    ev = B.evaluate_bag(drive_bag, small_world['bundle'], small_world['model'],
                        image_topic='/camera/image_raw/compressed', every=3, limit=12,
                        prior='fused', progress=False, localizer=loc)
    assert ev.bag.image_type == 'sensor_msgs/msg/CompressedImage'
    assert len(ev.frames) == 12
    assert ev.frames[0].prior  # the first frame already searches around the start pose
    assert all(f.status == 'fix' for f in ev.frames)


def test_eval_bag_bad_input_exits_2_with_one_line(small_world, drive_bag, tmp_path, capsys):
    args = ['--bundle', str(small_world['bundle']), '--model', str(small_world['model']),
            '--no-progress', '-o', str(tmp_path / 'r')]
    assert main(['eval-bag', str(tmp_path / 'missing'), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('geozoom eval-bag: error: bag') and '\n' not in err
    assert main(['eval-bag', str(drive_bag), '--image-topic', '/nope', *args]) == 2
    err = capsys.readouterr().err.strip()
    assert '/nope' in err and '--image-topic' in err and len(err.splitlines()) == 1
    assert main(['eval-bag', str(drive_bag), '--every', '0', *args]) == 2
    assert not (tmp_path / 'r').exists()
    # The storage file itself is accepted in place of the folder.
    copy = tmp_path / 'copy'
    shutil.copytree(drive_bag, copy)
    assert B.read_bag(copy / 'drive.mcap', quiet=True).path == copy


def test_fixes_published_by_a_node_can_be_scored(drive_bag):
    bag = B.read_bag(drive_bag, quiet=True)
    frames = []
    for i in range(0, len(bag.gt), 3):
        ns = bag.t0_ns + int(round(bag.gt.t[i] * 1e9))
        msg = _navsat(ns, float(bag.gt.lat[i]), float(bag.gt.lon[i]),
                      status=0 if i % 2 else -1)
        msg.position_covariance = np.array([400.0, 0, 0, 0, 400.0, 0, 0, 0, 1e6])
        frames.append(B.frame_fix_from_navsatfix(msg, bag, index=i, latency_ms=20.0))
    f = frames[1]
    assert f.gated_in and f.sigma_m == pytest.approx(20.0) and f.t == pytest.approx(
        bag.gt.t[3])
    assert not frames[0].gated_in
    ev = B.evaluate(bag, frames, quiet=True)
    assert ev.metrics['frames']['published'] == sum(f.gated_in for f in frames)
    assert ev.metrics['fixes']['median_error_m'] < 0.1
