"""Play a drive bag through the real node over rclpy and record what it publishes.

The node and `geozoom replay` run as their own processes, as on a robot; this process
subscribes to the node's fixes and diagnostics over rclpy. Used by `geozoom demo` and its
tests; the recorded NavSatFix messages are scored by ``geozoom_ros.eval.bag``.
"""

import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import threading
import time

from geozoom_ros.errors import GeoZoomError

#: Seconds the node may take to load its model and bundle and start publishing diagnostics.
NODE_START_TIMEOUT_S = 120.0


def ros_environment(log_dir):
    """Return an environment for rclpy processes kept on this machine, in their own domain."""
    env = dict(os.environ)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    env.setdefault('ROS_DOMAIN_ID', str(random.randint(120, 200)))
    env['ROS_LOG_DIR'] = str(log_dir)
    return env


def write_params(path, values):
    """Write a geozoom_node parameters file (``/**: ros__parameters:``) atomically."""
    import yaml

    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}, sort_keys=False))
    os.replace(tmp, path)
    return path


class _Recorder:
    """Subscribes to the node's fix and diagnostics topics and keeps what arrives."""

    def __init__(self, context, fix_topic, diagnostics_topic):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import NavSatFix

        self.node = Node('geozoom_live_recorder', context=context)
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.fixes = []
        self.diagnostics = {}
        self._lock = threading.Lock()
        self.node.create_subscription(NavSatFix, fix_topic, self._on_fix, qos)
        self.node.create_subscription(DiagnosticArray, diagnostics_topic, self._on_diag, 10)

    def _on_fix(self, msg):
        with self._lock:
            self.fixes.append(msg)

    def _on_diag(self, msg):
        for status in msg.status:
            if 'geozoom' in status.name:
                with self._lock:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}

    def snapshot(self):
        """Return ``(number of fixes, latest diagnostics dict)``."""
        with self._lock:
            return len(self.fixes), dict(self.diagnostics)


def _stop(proc, timeout=15.0):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_node_on_bag(bag, params, work_dir, rate=1.0, topics=None, progress=print):
    """Play ``bag`` to a geozoom_node started with ``params``; return the recorded fixes.

    ``params``: the node's parameters (dict of NodeParams fields; bundle and model set).
    ``topics``: the bag topics to play (default: the node's image topic and heading topic).
    Returns ``(fixes, diagnostics)``: the NavSatFix messages in arrival order and the node's
    last diagnostics values. Raises GeoZoomError with the node's last output line if it
    fails to start or dies.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from geozoom_ros.ros.params import NodeParams

    p = NodeParams.from_dict(dict(params), where='demo parameters', require_paths=False)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    env = ros_environment(work_dir / 'ros_log')
    params_file = write_params(work_dir / 'localize.yaml', p.to_dict())
    topics = topics or [p.image_topic] + ([p.heading_topic] if p.heading_source == 'imu' else [])
    node_log = open(work_dir / 'node.log', 'w')
    node = subprocess.Popen([sys.executable, '-m', 'geozoom_ros.ros.node', '--ros-args',
                             '--params-file', str(params_file)], env=env, stdout=node_log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    replay = None
    # rclpy reads the discovery range from the environment when the context starts.
    old_env = {k: os.environ.get(k) for k in ('ROS_AUTOMATIC_DISCOVERY_RANGE',)}
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = env['ROS_AUTOMATIC_DISCOVERY_RANGE']
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(env['ROS_DOMAIN_ID']))
    executor = SingleThreadedExecutor(context=context)
    recorder = _Recorder(context, p.fix_topic, p.diagnostics_topic)
    executor.add_node(recorder.node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        t0 = time.monotonic()
        while not recorder.snapshot()[1]:
            if node.poll() is not None:
                raise GeoZoomError('geozoom_node stopped at start-up: '
                                   + _last_line(work_dir / 'node.log'))
            if time.monotonic() - t0 > NODE_START_TIMEOUT_S:
                raise GeoZoomError(f'geozoom_node published no diagnostics within '
                                   f'{NODE_START_TIMEOUT_S:.0f} s; see {work_dir / "node.log"}')
            time.sleep(0.2)
        progress(f'node up after {time.monotonic() - t0:.1f} s; playing {bag} at {rate:g}x')
        replay = subprocess.Popen([sys.executable, '-m', 'geozoom_ros.cli', 'replay', str(bag),
                                   '--rate', str(rate), '--topics', *topics,
                                   '--wait-for-subscribers', '30', '--quiet'], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last = time.monotonic()
        while replay.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - last > 10.0:
                n, diag = recorder.snapshot()
                progress(f'  {n} fixes so far; node: {diag.get("frames_received", "?")} frames '
                         f'received, {diag.get("frames_processed", "?")} processed')
                last = time.monotonic()
            if node.poll() is not None:
                raise GeoZoomError('geozoom_node stopped during the replay: '
                                   + _last_line(work_dir / 'node.log'))
        if replay.returncode != 0:
            raise GeoZoomError(f'geozoom replay failed: {replay.stdout.read().strip()}')
        # Let the node finish the frame it holds: wait until processed + dropped stop moving.
        settle, prev = time.monotonic(), None
        while time.monotonic() - settle < 30.0:
            n, diag = recorder.snapshot()
            key = (n, diag.get('frames_processed'), diag.get('frames_dropped'))
            if key == prev:
                break
            prev = key
            time.sleep(2.0)
        n, diag = recorder.snapshot()
        return list(recorder.fixes), diag
    finally:
        if replay is not None and replay.poll() is None:
            _stop(replay)
        _stop(node)
        node_log.close()
        executor.shutdown()
        recorder.node.destroy_node()
        rclpy.try_shutdown(context=context)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _last_line(path):
    lines = [ln for ln in Path(path).read_text(errors='replace').splitlines() if ln.strip()]
    return lines[-1] if lines else f'(no output; see {path})'
