"""Isolation for tests that use real rclpy.

- Discovery stays on this machine (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``) and in a
  random ``ROS_DOMAIN_ID`` per test session, so parallel runs and other people's nodes never
  see each other's topics.
- Every rclpy process writes its log under a temporary ``ROS_LOG_DIR``.
- Each test gets its own rclpy ``Context`` (initialised, then shut down).
- Subprocesses are started in their own process group and killed at teardown, so no stray
  process outlives a test.
"""

import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

SOURCE_ROOT = Path(__file__).resolve().parents[2]
_DOMAIN_ID = random.SystemRandom().randint(1, 100)


@pytest.fixture(scope='session', autouse=True)
def ros_isolation(tmp_path_factory):
    """Set the isolation environment for this session (and the subprocesses it starts)."""
    log_dir = tmp_path_factory.mktemp('ros_log')
    values = {
        'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
        'ROS_DOMAIN_ID': str(_DOMAIN_ID),
        'ROS_LOG_DIR': str(log_dir),
        'RCUTILS_LOGGING_BUFFERED_STREAM': '0',
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    os.environ.pop('ROS_LOCALHOST_ONLY', None)
    yield values
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def rclpy_context(ros_isolation):
    """Give the test an initialised rclpy Context of its own; shut it down afterwards."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    context = Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    try:
        yield context
    finally:
        rclpy.try_shutdown(context=context)


class Spinner:
    """Spins nodes of a context on a background thread until stopped."""

    def __init__(self, context):
        from rclpy.executors import SingleThreadedExecutor

        self.executor = SingleThreadedExecutor(context=context)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, node):
        self.executor.add_node(node)
        return node

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.executor.spin_once(timeout_sec=0.02)
            except Exception:  # the context was shut down under us
                if self._stop.is_set():
                    return
                raise

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.executor.shutdown(timeout_sec=1)


@pytest.fixture
def spinner(rclpy_context):
    """Give a :class:`Spinner` for the test's context; stop it at teardown."""
    s = Spinner(rclpy_context)
    try:
        yield s
    finally:
        s.stop()


def subprocess_env(extra=None):
    """Environment for a child process: isolation variables and the source tree on the path."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(SOURCE_ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra or {})
    return env


class Processes:
    """Starts child processes in their own process group; kills what is left at the end."""

    def __init__(self, log_dir):
        self.log_dir = Path(log_dir)
        self.procs = []

    def start(self, argv, name='proc', env=None):
        """Start ``argv`` with stdout/stderr captured to files; return the Popen."""
        out = open(self.log_dir / f'{name}.{len(self.procs)}.out', 'w+b')
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=subprocess_env(env), cwd=str(SOURCE_ROOT),
                                start_new_session=True)
        proc.log_file = out
        self.procs.append(proc)
        return proc

    def geozoom(self, *args, name='geozoom', env=None):
        """Start ``python -m geozoom_ros.cli ARGS`` from the source tree."""
        return self.start([sys.executable, '-m', 'geozoom_ros.cli', *map(str, args)], name,
                          env)

    @staticmethod
    def output(proc):
        """Return everything the process wrote so far (text)."""
        proc.log_file.flush()
        proc.log_file.seek(0)
        return proc.log_file.read().decode(errors='replace')

    def wait(self, proc, timeout):
        """Wait for the process to exit; on timeout kill it and fail the test."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            pytest.fail(f'process {proc.args} did not finish in {timeout} s:\n'
                        f'{self.output(proc)}')

    @staticmethod
    def _kill(proc):
        if proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def cleanup(self):
        for proc in self.procs:
            self._kill(proc)
            try:  # the process group may hold children of the child
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.log_file.close()


@pytest.fixture
def processes(tmp_path, ros_isolation):
    """Give a :class:`Processes` whose children are all killed at teardown."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.cleanup()


def _wait_until(predicate, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def wait_until():
    """Give a function that polls a predicate until true or a timeout; returns its value."""
    return _wait_until
