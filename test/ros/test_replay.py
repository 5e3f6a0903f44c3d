"""`geozoom replay`: a bag published live over real rclpy, received by real subscribers."""

import signal
import threading
import time

import numpy as np
import pytest

from geozoom_ros.cli import main as geozoom_main
from geozoom_ros.geo import LocalFrame
from geozoom_ros.ros.conversions import compressed_msg_to_rgb, image_msg_to_rgb
from geozoom_ros.world import drive as D

FRAME = LocalFrame(47.3769, 8.5417)
TIMES = np.arange(5) * 0.25  # seconds
ENU = np.stack([TIMES * 8.0, TIMES * -3.0], axis=1)
START_NS = D.DEFAULT_START_NS


def _frames():
    """Distinct, smooth 64x48 frames (smooth so that JPEG keeps them close)."""
    import cv2
    rng = np.random.default_rng(11)
    return [cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (64, 48),
                       interpolation=cv2.INTER_LINEAR) for _ in TIMES]


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp('bags')
    out = {}
    for storage in ('mcap', 'sqlite3'):
        out[storage] = D.write_drive_bag_from_poses(
            root / f'drive_{storage}', FRAME, TIMES, ENU, _frames(), fov_deg=90.0,
            storage=storage, progress=False)
    return out


class Recorder:
    """Subscribes to topics with reliable QoS and keeps (arrival time, message)."""

    def __init__(self, context, topics, name='recorder'):
        import rclpy
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from geozoom_ros.ros.replay import message_class

        self.node = rclpy.create_node(name, context=context)
        self.received = {t: [] for t in topics}
        self._lock = threading.Lock()
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        for topic, msgtype in topics.items():
            self.node.create_subscription(message_class(msgtype), topic,
                                          lambda m, t=topic: self._on(t, m), qos)

    def _on(self, topic, msg):
        with self._lock:
            self.received[topic].append((time.monotonic(), msg))

    def count(self, topic):
        with self._lock:
            return len(self.received[topic])


def _stamp_ns(msg):
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def _check_timing(items, spacing_s, tol_s=0.1):
    """Arrival times keep the recorded spacing: median gap and whole span within ``tol_s``."""
    arrivals = np.array([t for t, _ in items])
    gaps = np.diff(arrivals)
    assert abs(np.median(gaps) - spacing_s) < tol_s, gaps
    assert abs((arrivals[-1] - arrivals[0]) - spacing_s * len(gaps)) < tol_s, gaps
    # Not delivered in a burst: most gaps are close to the recorded one.
    assert np.mean(np.abs(gaps - spacing_s) < tol_s) >= 0.7, gaps


def test_replay_subprocess_delivers_every_message_with_timing(bags, rclpy_context, spinner,
                                                              processes, wait_until):
    topics = {D.TOPIC_IMAGE: D.DRIVE_TOPICS[D.TOPIC_IMAGE],
              D.TOPIC_IMAGE_COMPRESSED: D.DRIVE_TOPICS[D.TOPIC_IMAGE_COMPRESSED],
              D.TOPIC_GPS_TRUTH: D.DRIVE_TOPICS[D.TOPIC_GPS_TRUTH],
              D.TOPIC_CAMERA_INFO: D.DRIVE_TOPICS[D.TOPIC_CAMERA_INFO]}
    rec = Recorder(rclpy_context, topics)
    spinner.add(rec.node)
    spinner.start()
    proc = processes.geozoom('replay', bags['mcap'], '--wait-for-subscribers', 15, '--quiet')
    assert processes.wait(proc, 40) == 0, processes.output(proc)
    assert wait_until(lambda: all(rec.count(t) == 5 for t in topics), 5), rec.received
    out = processes.output(proc)
    assert 'done: 20 messages on 4 topics' in out, out

    frames = _frames()
    images = rec.received[D.TOPIC_IMAGE]
    for i, (_, msg) in enumerate(images):
        assert _stamp_ns(msg) == START_NS + int(round(TIMES[i] * 1e9))
        assert msg.header.frame_id == D.FRAME_CAMERA
        np.testing.assert_array_equal(image_msg_to_rgb(msg), frames[i])
    for i, (_, msg) in enumerate(rec.received[D.TOPIC_IMAGE_COMPRESSED]):
        assert np.abs(compressed_msg_to_rgb(msg).astype(int) - frames[i]).mean() < 8
    lat, lon, _ = FRAME.to_latlon(ENU[:, 0], ENU[:, 1], np.zeros(len(ENU)))
    for i, (_, fix) in enumerate(rec.received[D.TOPIC_GPS_TRUTH]):
        assert fix.latitude == pytest.approx(lat[i], abs=1e-12)
        assert fix.longitude == pytest.approx(lon[i], abs=1e-12)
    info = rec.received[D.TOPIC_CAMERA_INFO][0][1]
    assert info.width == 64 and info.k[0] == pytest.approx(32.0)
    _check_timing(images, 0.25)


def test_replay_subprocess_rate_topics_offset_on_sqlite3(bags, rclpy_context, spinner,
                                                         processes, wait_until):
    topics = {D.TOPIC_GPS_TRUTH: D.DRIVE_TOPICS[D.TOPIC_GPS_TRUTH],
              D.TOPIC_IMAGE: D.DRIVE_TOPICS[D.TOPIC_IMAGE]}
    rec = Recorder(rclpy_context, topics)
    spinner.add(rec.node)
    spinner.start()
    proc = processes.geozoom('replay', bags['sqlite3'], '--rate', 0.5, '--topics',
                             D.TOPIC_GPS_TRUTH, '--start-offset', 0.3,
                             '--wait-for-subscribers', 15, '--quiet')
    assert processes.wait(proc, 40) == 0, processes.output(proc)
    assert wait_until(lambda: rec.count(D.TOPIC_GPS_TRUTH) == 3, 5)
    time.sleep(0.2)
    assert rec.count(D.TOPIC_IMAGE) == 0
    fixes = rec.received[D.TOPIC_GPS_TRUTH]
    expected = [START_NS + int(round(t * 1e9)) for t in TIMES[2:]]
    assert [_stamp_ns(m) for _, m in fixes] == expected
    _check_timing(fixes, 0.5)  # 0.25 s of bag time at half speed


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_replay_loop_stops_cleanly_on_signal(sig, bags, rclpy_context, spinner, processes,
                                             wait_until):
    rec = Recorder(rclpy_context, {D.TOPIC_GPS_TRUTH: D.DRIVE_TOPICS[D.TOPIC_GPS_TRUTH]})
    spinner.add(rec.node)
    spinner.start()
    proc = processes.geozoom('replay', bags['mcap'], '--loop', '--rate', 5, '--topics',
                             D.TOPIC_GPS_TRUTH, '--wait-for-subscribers', 15, '--quiet')
    assert wait_until(lambda: rec.count(D.TOPIC_GPS_TRUTH) >= 8, 30), processes.output(proc)
    proc.send_signal(sig)
    assert processes.wait(proc, 10) == 0, processes.output(proc)
    out = processes.output(proc)
    assert 'stopped:' in out and 'Traceback' not in out, out
    stamps = [_stamp_ns(m) for _, m in rec.received[D.TOPIC_GPS_TRUTH]]
    assert stamps[5] == stamps[0]  # the second pass replays the same messages


def test_replay_api_in_process(bags, rclpy_context, spinner):
    from geozoom_ros.ros.replay import BagPlayer, BagSource, replay_bag

    rec = Recorder(rclpy_context, {D.TOPIC_GPS_TRUTH: D.DRIVE_TOPICS[D.TOPIC_GPS_TRUTH],
                                   D.TOPIC_IMAGE: D.DRIVE_TOPICS[D.TOPIC_IMAGE],
                                   '/clock': 'rosgraph_msgs/msg/Clock'})
    spinner.add(rec.node)
    spinner.start()
    stats = replay_bag(bags['mcap'], context=rclpy_context, rate=4.0,
                       topics=[D.TOPIC_GPS_TRUTH, D.TOPIC_IMAGE], wait_for_subscribers_s=10,
                       progress=False)
    assert stats.messages == 10 and stats.loops == 1 and not stats.stopped
    assert stats.per_topic == {D.TOPIC_GPS_TRUTH: 5, D.TOPIC_IMAGE: 5}
    assert stats.bag_span_s == pytest.approx(1.0)
    assert 0.2 < stats.wall_s < 0.6  # 1 s of bag at rate 4
    deadline = time.monotonic() + 5
    while rec.count(D.TOPIC_IMAGE) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.count(D.TOPIC_IMAGE) == 5 and rec.count(D.TOPIC_GPS_TRUTH) == 5
    _check_timing(rec.received[D.TOPIC_IMAGE], 0.0625, tol_s=0.04)

    # A looping player stops when its event is set, from another thread.
    import rclpy
    node = rclpy.create_node('loop_player', context=rclpy_context)
    try:
        player = BagPlayer(node, BagSource(bags['sqlite3']), loop=True, rate=10.0,
                           progress=False, clock=True)
        stop = threading.Event()
        threading.Timer(0.5, stop.set).start()
        stats = player.play(stop)
        player.close()
    finally:
        node.destroy_node()
    assert stats.stopped and stats.loops >= 2 and stats.messages > 40
    assert rec.count('/clock') > 20  # the bag time, for use_sim_time nodes
    clock_ns = {m.clock.sec * 10**9 + m.clock.nanosec for _, m in rec.received['/clock']}
    assert clock_ns <= {START_NS + int(round(t * 1e9)) for t in TIMES}


def test_qos_presets():
    from rclpy.qos import ReliabilityPolicy

    from geozoom_ros.errors import InputError
    from geozoom_ros.ros.replay import make_qos

    assert make_qos('reliable', 7).reliability == ReliabilityPolicy.RELIABLE
    assert make_qos('reliable', 7).depth == 7
    assert make_qos('sensor').reliability == ReliabilityPolicy.BEST_EFFORT
    with pytest.raises(InputError):
        make_qos('fast')


def _write_bag(path, storage, messages):
    """Write a rosbag2 with rosbags: messages = [(topic, msgtype, t_ns, msg or None)]."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import get_typestore, Stores

    ts = get_typestore(Stores.ROS2_KILTED)
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for topic, msgtype, t_ns, msg in messages:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            if msg is not None:
                writer.write(conns[topic], t_ns, ts.serialize_cdr(msg, msgtype))
    return path


def _fix_msg(ns):
    from rosbags.typesys import get_typestore, Stores
    T = get_typestore(Stores.ROS2_KILTED).types
    return T['sensor_msgs/msg/NavSatFix'](
        header=T['std_msgs/msg/Header'](
            stamp=T['builtin_interfaces/msg/Time'](sec=ns // 10**9, nanosec=ns % 10**9),
            frame_id='gps'),
        status=T['sensor_msgs/msg/NavSatStatus'](status=0, service=1),
        latitude=1.0, longitude=2.0, altitude=3.0, position_covariance=np.zeros(9),
        position_covariance_type=0)


def test_uninstalled_message_types_are_skipped_with_a_warning(tmp_path, rclpy_context, capsys):
    from rosbags.typesys import get_typestore, Stores

    from geozoom_ros.ros.replay import replay_bag

    T = get_typestore(Stores.ROS2_KILTED).types
    tf = T['tf2_msgs/msg/TFMessage'](transforms=[])
    bag = _write_bag(tmp_path / 'tf', 'mcap', [
        ('/fix', 'sensor_msgs/msg/NavSatFix', START_NS, _fix_msg(START_NS)),
        ('/tf', 'tf2_msgs/msg/TFMessage', START_NS + 1000, tf)])
    try:
        import tf2_msgs  # noqa: F401
        pytest.skip('tf2_msgs is installed here')
    except ImportError:
        pass
    stats = replay_bag(bag, context=rclpy_context, progress=False, flush_timeout_s=0)
    assert stats.per_topic == {'/fix': 1}
    assert '/tf' in stats.skipped_topics
    assert 'skipping /tf' in capsys.readouterr().err
    # Asked for by name, the missing package is an error.
    with pytest.raises(Exception, match='tf2_msgs/msg/TFMessage is not installed'):
        replay_bag(bag, context=rclpy_context, topics=['/tf'], progress=False)


def _cli_error(capsys, *args):
    rc = geozoom_main(['replay', *map(str, args), '--quiet'])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('geozoom replay: error: '), err
    return lines[0]


def test_bad_bags_and_arguments_give_one_line(tmp_path, bags, capsys, ros_isolation):
    assert 'no such file' in _cli_error(capsys, tmp_path / 'missing')
    (tmp_path / 'plain').mkdir()
    assert 'no metadata.yaml' in _cli_error(capsys, tmp_path / 'plain')
    empty = _write_bag(tmp_path / 'empty', 'mcap',
                       [('/fix', 'sensor_msgs/msg/NavSatFix', 0, None)])
    assert 'no messages' in _cli_error(capsys, empty)
    assert 'topic /nope is not in the bag' in _cli_error(capsys, bags['mcap'], '--topics',
                                                         '/nope')
    assert 'rate' in _cli_error(capsys, bags['mcap'], '--rate', 0)
    assert 'rate' in _cli_error(capsys, bags['mcap'], '--rate', 'nan')
    assert 'past the end' in _cli_error(capsys, bags['mcap'], '--start-offset', 30)
    assert 'at least 1' in _cli_error(capsys, bags['mcap'], '--depth', 0)
    # A storage file given instead of its folder is accepted.
    stats_rc = geozoom_main(['replay', str(bags['mcap'] / 'drive_mcap.mcap'), '--quiet',
                             '--rate', '50', '--topics', D.TOPIC_GPS_TRUTH])
    assert stats_rc == 0
    capsys.readouterr()


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_truncated_and_corrupt_bags_give_one_line(storage, tmp_path, capsys, ros_isolation):
    msgs = [('/fix', 'sensor_msgs/msg/NavSatFix', START_NS + i * 10**8,
             _fix_msg(START_NS + i * 10**8)) for i in range(200)]
    bag = _write_bag(tmp_path / 'b', storage, msgs)
    data_file = bag / f'b.{"db3" if storage == "sqlite3" else "mcap"}'
    raw = data_file.read_bytes()
    data_file.write_bytes(raw[:len(raw) // 2])
    line = _cli_error(capsys, bag, '--rate', 1000)
    assert 'truncated or corrupt' in line, line
    data_file.write_bytes(b'\x00garbage' * 100)
    line = _cli_error(capsys, bag, '--rate', 1000)
    assert 'truncated or corrupt' in line, line


def test_missing_bag_subprocess_prints_one_line(processes, tmp_path):
    proc = processes.geozoom('replay', tmp_path / 'nothing')
    assert processes.wait(proc, 30) == 2
    out = processes.output(proc).strip()
    assert out.startswith('geozoom replay: error: bag ') and '\n' not in out, out


def test_message_classes_of_the_drive_topics():
    from geozoom_ros.errors import InputError
    from geozoom_ros.ros.replay import message_class

    for topic, msgtype in D.DRIVE_TOPICS.items():
        if topic == D.TOPIC_TF:
            continue
        cls = message_class(msgtype)
        assert cls.__name__ == msgtype.rsplit('/', 1)[1]
    assert message_class('sensor_msgs/Image').__name__ == 'Image'
    with pytest.raises(InputError, match='not installed'):
        message_class('no_such_msgs/msg/Thing')
    with pytest.raises(InputError, match='form'):
        message_class('Image')
