"""Play a rosbag2 live over rclpy with its original timing (a stand-in for ``ros2 bag play``).

The bag (MCAP or sqlite3 storage) is read with rosbags; every message is republished as the
serialized CDR bytes stored in the bag (rclpy's ``Publisher.publish(bytes)``), so nothing is
decoded or re-encoded on the way. Message classes come from the installed message packages
(``<pkg>.msg``). Timing: a message recorded ``dt`` nanoseconds after the first message played
is published ``dt / rate`` after playback started.

rclpy is imported only when a player is created, so bag inspection works without ROS.
"""

from dataclasses import dataclass, field
import importlib
from pathlib import Path
import sqlite3
import struct
import sys
import threading
import time

from geozoom_ros.errors import InputError

#: QoS presets of the publishers: 'reliable' (keep last ``depth``; what replays between
#: processes need for large images) or 'sensor' (best effort, as camera drivers publish).
QOS_CHOICES = ('reliable', 'sensor')
DEFAULT_DEPTH = 100


@dataclass
class ReplayStats:
    """What a replay did: message counts per topic, wall time, loops, and why it ended."""

    messages: int = 0
    per_topic: dict = field(default_factory=dict)
    wall_s: float = 0.0
    bag_span_s: float = 0.0
    loops: int = 0
    stopped: bool = False
    skipped_topics: dict = field(default_factory=dict)
    max_lateness_s: float = 0.0


def _read_errors():
    from rosbags.rosbag2.errors import ReaderError
    return (ReaderError, sqlite3.DatabaseError, struct.error, EOFError, ValueError, KeyError,
            IndexError, AssertionError, OSError)


def resolve_bag_path(path):
    """Return the rosbag2 folder for ``path`` (the folder, or a storage file inside it)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f'bag {path}: no such file or folder; give a rosbag2 folder '
                         '(with metadata.yaml)')
    if p.is_file():
        if p.name == 'metadata.yaml' or (p.parent / 'metadata.yaml').exists():
            return p.parent
        raise InputError(f'bag {path}: a rosbag2 is a folder with metadata.yaml next to its '
                         f'{p.suffix or "storage"} file; none found in {p.parent}')
    if not (p / 'metadata.yaml').exists():
        raise InputError(f'bag {path}: folder has no metadata.yaml; it is not a rosbag2 '
                         '(give the folder ros2 bag record or geozoom wrote)')
    return p


class BagSource:
    """A rosbag2 opened for replay: topics, message types, counts and the raw messages.

    Raises :class:`InputError` (one line) for a missing, empty, truncated or corrupt bag and
    for requested topics the bag does not hold.
    """

    def __init__(self, path, topics=None):
        from rosbags.rosbag2 import Reader

        self.path = resolve_bag_path(path)
        self._reader_cls = Reader
        errors = _read_errors()
        try:
            with Reader(self.path) as reader:
                conns = list(reader.connections)
                self.start_ns = reader.start_time
                self.end_ns = reader.end_time
                self.message_count = reader.message_count
        except errors as exc:
            raise InputError(f'bag {path}: cannot be read, it is truncated or corrupt '
                             f'({_one_line(exc)})') from None
        if not conns or self.message_count == 0:
            raise InputError(f'bag {path}: holds no messages; record or write a bag with '
                             'messages first')
        self.all_topics = {}
        for c in conns:
            self.all_topics.setdefault(c.topic, c.msgtype)
        if topics:
            unknown = [t for t in topics if t not in self.all_topics]
            if unknown:
                raise InputError(f'bag {path}: topic {", ".join(unknown)} is not in the bag; it '
                                 f'holds {", ".join(sorted(self.all_topics))}')
            self.topics = {t: self.all_topics[t] for t in topics}
        else:
            self.topics = dict(self.all_topics)
        self.counts = {}
        for c in conns:
            if c.topic in self.topics:
                self.counts[c.topic] = self.counts.get(c.topic, 0) + c.msgcount

    @property
    def selected_count(self):
        """Number of messages on the selected topics."""
        return sum(self.counts.values())

    def messages(self, start_offset_s=0.0, topics=None):
        """Yield ``(topic, msgtype, timestamp_ns, raw_cdr_bytes)`` in bag order.

        ``start_offset_s`` skips the first seconds of the bag; ``topics`` restricts the topics
        further. A bag that breaks off while being read raises :class:`InputError`.
        """
        wanted = set(topics if topics is not None else self.topics)
        start = self.start_ns + int(round(start_offset_s * 1e9))
        errors = _read_errors()
        try:
            with self._reader_cls(self.path) as reader:
                conns = [c for c in reader.connections if c.topic in wanted]
                for conn, ts, raw in reader.messages(connections=conns, start=start):
                    yield conn.topic, conn.msgtype, ts, bytes(raw)
        except errors as exc:
            raise InputError(f'bag {self.path}: reading stopped, the bag is truncated or '
                             f'corrupt ({_one_line(exc)})') from None


def _one_line(exc):
    text = ' '.join(str(exc).split())
    return text[:200] or type(exc).__name__


def message_class(msgtype):
    """Return the installed rclpy message class of ``pkg/msg/Name`` (or ``pkg/Name``).

    Uses ``rosidl_runtime_py.utilities.get_message`` where installed, else imports
    ``pkg.msg``. Raises :class:`InputError` if the package is not installed.
    """
    parts = msgtype.split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise InputError(f'message type {msgtype!r} is not of the form pkg/msg/Name')
    try:
        from rosidl_runtime_py.utilities import get_message
    except ImportError:
        get_message = None
    if get_message is not None:
        try:
            return get_message('/'.join(parts))
        except (AttributeError, ModuleNotFoundError, ValueError):
            pass
    pkg, sub, name = parts
    try:
        module = importlib.import_module(f'{pkg}.{sub}')
        return getattr(module, name)
    except (ImportError, AttributeError):
        raise InputError(f'message type {msgtype} is not installed; install its package '
                         f'(e.g. pip install ros-{pkg.replace("_", "-")}) or leave the topic '
                         'out with --topics') from None


def make_qos(qos='reliable', depth=DEFAULT_DEPTH):
    """Return the rclpy QoSProfile of a preset name (see :data:`QOS_CHOICES`)."""
    from rclpy.qos import (DurabilityPolicy, HistoryPolicy, qos_profile_sensor_data, QoSProfile,
                           ReliabilityPolicy)
    if qos == 'reliable':
        if int(depth) < 1:
            raise InputError(f'--depth {depth}: the queue depth must be at least 1')
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    if qos == 'sensor':
        return qos_profile_sensor_data
    raise InputError(f'--qos {qos!r} is unknown; use {" or ".join(QOS_CHOICES)}')


class BagPlayer:
    """Publishes a :class:`BagSource` on an rclpy node with the bag's timing.

    ``rate`` scales time (2.0 = twice as fast), ``loop`` replays until stopped,
    ``start_offset_s`` skips the bag's first seconds, ``clock`` also publishes the bag time on
    ``/clock`` (rosgraph_msgs/Clock) for nodes with ``use_sim_time``. Topics whose message
    package is not installed are skipped with a warning unless named in ``topics``.
    """

    def __init__(self, node, bag, *, rate=1.0, topics=None, loop=False, start_offset_s=0.0,
                 qos='reliable', depth=DEFAULT_DEPTH, clock=False, progress=True, out=None):
        if not (rate > 0 and rate < float('inf')):
            raise InputError(f'--rate {rate}: the playback rate must be a positive number')
        if not start_offset_s >= 0:
            raise InputError(f'--start-offset {start_offset_s}: must be zero or more seconds')
        self.node = node
        self.bag = bag if isinstance(bag, BagSource) else BagSource(bag, topics)
        span_s = (self.bag.end_ns - self.bag.start_ns) / 1e9
        if start_offset_s >= span_s and start_offset_s > 0:
            raise InputError(f'--start-offset {start_offset_s} s is past the end of the bag '
                             f'({span_s:.2f} s long)')
        self.rate = float(rate)
        self.loop = bool(loop)
        self.start_offset_s = float(start_offset_s)
        self.progress = progress
        self.out = out or sys.stderr
        self.qos = make_qos(qos, depth)
        self.publishers = {}
        self.skipped = {}
        explicit = set(topics or ())
        for topic, msgtype in sorted(self.bag.topics.items()):
            try:
                cls = message_class(msgtype)
            except InputError as exc:
                if topic in explicit:
                    raise
                self.skipped[topic] = str(exc)
                continue
            self.publishers[topic] = node.create_publisher(cls, topic, self.qos)
        if not self.publishers:
            raise InputError(f'bag {self.bag.path}: none of its message types is installed '
                             f'({"; ".join(self.skipped.values())})')
        self.clock_pub = None
        if clock:
            from rosgraph_msgs.msg import Clock
            self.clock_pub = node.create_publisher(Clock, '/clock', 10)

    def wait_for_subscribers(self, timeout_s, stop_event=None):
        """Wait until every publisher has a matched subscription; return whether they all do."""
        deadline = time.monotonic() + float(timeout_s)
        while True:
            if all(p.get_subscription_count() > 0 for p in self.publishers.values()):
                return True
            if time.monotonic() >= deadline or (stop_event is not None and stop_event.is_set()):
                return False
            time.sleep(0.02)

    def play(self, stop_event=None):
        """Publish the messages with their timing; return :class:`ReplayStats`.

        Returns early, with ``stopped`` set, when ``stop_event`` (a threading.Event) is set.
        """
        from tqdm import tqdm

        stop_event = stop_event or threading.Event()
        stats = ReplayStats(skipped_topics=dict(self.skipped))
        for topic, reason in self.skipped.items():
            print(f'geozoom replay: skipping {topic}: {reason}', file=self.out)
        topics = list(self.publishers)
        total = sum(self.bag.counts[t] for t in topics)
        t_start = time.monotonic()
        bar = tqdm(total=None if self.loop else total, desc=f'replay {self.bag.path.name}',
                   unit='msg', disable=not self.progress, file=self.out)
        try:
            while not stop_event.is_set():
                first_ns = None
                loop_t0 = time.monotonic()
                last_ns = None
                for topic, _, ts, raw in self.bag.messages(self.start_offset_s, topics):
                    if first_ns is None:
                        first_ns = ts
                    target = loop_t0 + (ts - first_ns) / 1e9 / self.rate
                    delay = target - time.monotonic()
                    if delay > 0 and stop_event.wait(delay):
                        break
                    if stop_event.is_set():
                        break
                    stats.max_lateness_s = max(stats.max_lateness_s, -delay)
                    self.publishers[topic].publish(raw)
                    if self.clock_pub is not None:
                        self._publish_clock(ts)
                    stats.messages += 1
                    stats.per_topic[topic] = stats.per_topic.get(topic, 0) + 1
                    last_ns = ts
                    bar.update(1)
                if first_ns is not None and last_ns is not None:
                    stats.bag_span_s = max(stats.bag_span_s, (last_ns - first_ns) / 1e9)
                if not stop_event.is_set():
                    stats.loops += 1
                if not self.loop or first_ns is None:
                    break
        finally:
            bar.close()
        stats.stopped = stop_event.is_set()
        stats.wall_s = time.monotonic() - t_start
        return stats

    def _publish_clock(self, ts):
        from rosgraph_msgs.msg import Clock
        msg = Clock()
        msg.clock.sec = int(ts // 1_000_000_000)
        msg.clock.nanosec = int(ts % 1_000_000_000)
        self.clock_pub.publish(msg)

    def flush(self, timeout_s=5.0):
        """Wait (up to ``timeout_s``) until reliable subscribers acknowledged every message."""
        from rclpy.duration import Duration
        ok = True
        for pub in self.publishers.values():
            ok = pub.wait_for_all_acked(Duration(seconds=float(timeout_s))) and ok
        return ok

    def close(self):
        """Destroy the publishers (the node stays)."""
        for pub in list(self.publishers.values()):
            self.node.destroy_publisher(pub)
        if self.clock_pub is not None:
            self.node.destroy_publisher(self.clock_pub)
        self.publishers.clear()


def replay_bag(bag_path, *, context=None, node_name='geozoom_replay', stop_event=None,
               wait_for_subscribers_s=0.0, flush_timeout_s=5.0, **options):
    """Replay a bag on a node of its own in ``context`` (rclpy must be initialised there).

    ``options`` are those of :class:`BagPlayer` (``rate``, ``topics``, ``loop``,
    ``start_offset_s``, ``qos``, ``depth``, ``clock``, ``progress``). Waits up to
    ``wait_for_subscribers_s`` seconds for a subscriber on every topic before playing and up
    to ``flush_timeout_s`` for reliable deliveries to be acknowledged at the end. Returns
    :class:`ReplayStats`.
    """
    import rclpy

    bag = BagSource(bag_path, options.get('topics'))
    node = rclpy.create_node(node_name, context=context)
    player = None
    try:
        player = BagPlayer(node, bag, **options)
        if wait_for_subscribers_s > 0:
            player.wait_for_subscribers(wait_for_subscribers_s, stop_event)
        stats = player.play(stop_event)
        if flush_timeout_s > 0 and not stats.stopped:
            player.flush(flush_timeout_s)
        return stats
    finally:
        if player is not None:
            player.close()
        node.destroy_node()
