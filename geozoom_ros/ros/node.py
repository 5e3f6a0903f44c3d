"""``geozoom_node``: the ROS 2 localization node, a thin shell around GeoZoomLocalizer.

Camera frames arrive on a sensor-data QoS subscription; the callback only stores the newest
frame (a waiting older one is dropped and counted), so callbacks never block. One worker
thread, at most ``max_rate_hz`` times a second, decodes the newest frame, localises it with
:class:`~geozoom_ros.localizer.GeoZoomLocalizer` (optionally with a heading and a prior) and
publishes:

- ``sensor_msgs/NavSatFix``: stamp = the image's stamp, ``status`` FIX when the fix passes the
  gate (the confidence threshold fitted for the search in calibration.json or
  ``min_confidence``, and ``max_sigma_m``) and NO_FIX otherwise, a numeric altitude, and
  ``position_covariance`` (east, north, up; m^2) from the search, COVARIANCE_TYPE_APPROXIMATED;
- ``geometry_msgs/PoseWithCovarianceStamped`` (gated-in fixes only) in the local frame (ENU
  about the datum, turned by ``datum_yaw`` like robot_localization's map frame) or in UTM;
- ``geometry_msgs/PoseArray`` of the top hypotheses, in the same frame;
- ``diagnostic_msgs/DiagnosticArray`` every ``diagnostics_period_s``.

A bad frame, heading or prior (unknown encoding, empty or odd-sized image, step mismatch,
corrupt JPEG, NaN or off-map prior) gives a throttled warning, a diagnostics entry and no fix;
the node keeps running. A bad parameter, a missing file or a map bundle built for another
model stops start-up with one line on stderr and exit status 2.
"""

from collections import deque
import math
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Pose, PoseArray, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import (HistoryPolicy, qos_profile_sensor_data, QoSProfile, ReliabilityPolicy)
from sensor_msgs.msg import CompressedImage, Image, Imu, NavSatFix, NavSatStatus

from geozoom_ros.errors import GeoZoomError, InputError
from geozoom_ros.geo import latlon_to_utm, LocalFrame, utm_epsg
from geozoom_ros.ros import params as P
from geozoom_ros.ros.conversions import compressed_msg_to_rgb, ConversionError, image_msg_to_rgb
from geozoom_ros.ros.gating import (compass_heading_deg, Gate, LatestFrame, prior_from_navsatfix,
                                    prior_from_odometry, PriorMonitor, RATE_WINDOW_S, rotate_cov,
                                    stamp_ns, Throttle, UNKNOWN_VARIANCE, yaw_from_quaternion)

#: Problem kind -> the statistics counter it increments (kinds not listed count elsewhere).
_COUNTERS = {'image': 'bad_images', 'prior': 'bad_priors', 'prior_block': 'frames_no_fix_prior',
             'heading': 'bad_headings', 'error': 'errors'}


class _Stamped:
    """A value with the monotonic time it arrived and, for bad input, why it is bad."""

    __slots__ = ('value', 't', 'error')

    def __init__(self, value, t, error=None):
        self.value, self.t, self.error = value, t, error


def _check_topic_names(p):
    """Raise ConfigError (one line) for a topic parameter that is no valid ROS topic name."""
    from rclpy.exceptions import InvalidTopicNameException
    from rclpy.validate_topic_name import validate_topic_name

    for name in ('image_topic', 'fix_topic', 'pose_topic', 'hypotheses_topic',
                 'diagnostics_topic', 'prior_topic', 'heading_topic'):
        value = getattr(p, name)
        if not value:
            continue
        try:
            validate_topic_name(value)
        except InvalidTopicNameException as exc:
            why = str(exc).splitlines()[0].rstrip(':').replace('Invalid topic name: ', '')
            raise P.ConfigError(f'parameter {name}={value!r} is not a valid ROS topic name '
                                f'({why})') from None


def _make_converter(choice, transport, log):
    """Return ``msg -> RGB uint8 array`` for a transport, and the converter's name."""
    own = compressed_msg_to_rgb if transport == 'compressed' else image_msg_to_rgb
    if choice == 'own':
        return own, 'own'
    try:
        from cv_bridge import CvBridge
        bridge = CvBridge()
        # PyPI's cv_bridge is ROS 1's and fails with numpy 2: try one conversion first.
        probe = Image(height=2, width=2, encoding='rgb8', step=6, data=bytes(range(12)))
        ok = bridge.imgmsg_to_cv2(probe, desired_encoding='rgb8').shape == (2, 2, 3)
    except Exception as exc:  # noqa: B902 - any failure means: not a usable cv_bridge
        if choice == 'cv_bridge':
            raise P.ConfigError(f'image_converter=cv_bridge but cv_bridge is not usable '
                                f'({P._one_line(exc)}); use image_converter:=own') from None
        return own, 'own'
    if not ok:
        return own, 'own'

    def convert(msg):
        try:
            if transport == 'compressed':
                rgb = bridge.compressed_imgmsg_to_cv2(msg, desired_encoding='rgb8')
            else:
                rgb = bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8')
        except Exception as exc:  # noqa: B902 - cv_bridge raises several types
            raise ConversionError(f'cv_bridge: {P._one_line(exc)}') from None
        if rgb is None or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
            raise ConversionError('cv_bridge returned no RGB image')
        return np.ascontiguousarray(rgb, dtype=np.uint8)

    log.info('decoding images with cv_bridge')
    return convert, 'cv_bridge'


# --------------------------------------------------------------------------------------------
# The node

class GeoZoomNode(Node):
    """The localization node (see the module docstring).

    Args:
        params: base :class:`~geozoom_ros.ros.params.NodeParams`; ROS overrides
            (``--ros-args -p``/``--params-file``) win over them. None = the defaults.
        localizer: a ready :class:`~geozoom_ros.localizer.GeoZoomLocalizer` (e.g. shared
            with an offline evaluation); None = load ``bundle`` and ``model``.
        node_name, context, **kwargs: as for ``rclpy.node.Node``.
    """

    def __init__(self, params=None, *, localizer=None, node_name=P.NODE_NAME, context=None,
                 **kwargs):
        super().__init__(node_name, context=context, **kwargs)
        self._worker = None
        self._stop = threading.Event()
        try:
            self._setup(params, localizer)
        except BaseException:
            self.destroy_node()
            raise

    # -- start-up ----------------------------------------------------------------------------

    def _setup(self, params, localizer):
        p = self.params = P.declare(self, params)
        _check_topic_names(p)
        if localizer is None:
            p.validate(f'node {self.get_name()}', check_files=True)
            from geozoom_ros.localizer import GeoZoomLocalizer
            options = {'device': p.device} if p.device else {}
            localizer = GeoZoomLocalizer(p.bundle, p.model, backend=p.backend,
                                         beam_width=p.beam_width, method=p.method,
                                         cov_scale=p.cov_scale, max_roots=p.max_roots,
                                         shortlist_level=p.shortlist_level,
                                         calibration=p.calibration,
                                         retrieval_model=p.retrieval_model or None,
                                         zoom_weight=p.zoom_weight, **options)
        self.localizer = localizer
        if p.datum_source == 'map_center':
            w, s, e, n = localizer.bundle.bounds
            self.datum = (0.5 * (s + n), 0.5 * (w + e))  # as params.map_center()
        else:
            self.datum = (p.datum_latitude, p.datum_longitude)
        self.frame = LocalFrame(*self.datum)
        self.utm_epsg = utm_epsg(*self.datum)
        self.convert, self.converter_name = _make_converter(p.image_converter,
                                                            p.image_transport, self.get_logger())

        self._lock = threading.Lock()
        self._slot = LatestFrame()
        self._throttle = Throttle(p.warn_throttle_s)
        self._monitor = PriorMonitor(p.prior_disagree_count)
        self._gate = Gate.from_params(p).use_calibration(localizer.calibration)
        self._prior = None
        self._heading = None
        self.stats = {'frames_received': 0, 'frames_processed': 0, 'frames_dropped': 0,
                      'fixes_published': 0, 'fixes_gated_out': 0, 'no_cell_reached': 0,
                      'bad_images': 0, 'bad_priors': 0, 'frames_no_fix_prior': 0,
                      'bad_headings': 0, 'errors': 0, 'prior_fallbacks': 0}
        self._arrivals = deque()
        self._latency_ms = deque(maxlen=200)
        self._publish_latency_ms = deque(maxlen=200)
        self._stamp_latency_ms = deque(maxlen=200)
        self._last_fix = None          # (monotonic time, fix, gated_in)
        self._problems = {}            # kind -> (monotonic time, message)
        self._problem_since_diag = False
        self.heading_mode = 'off'
        self.prior_mode = 'off'

        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                              reliability=ReliabilityPolicy.RELIABLE)
        self.fix_pub = self.create_publisher(NavSatFix, p.fix_topic, reliable)
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, p.pose_topic,
                                              reliable) if p.pose_topic else None
        self.hyp_pub = self.create_publisher(PoseArray, p.hypotheses_topic, reliable) \
            if p.hypotheses_topic else None
        self.diag_pub = self.create_publisher(DiagnosticArray, p.diagnostics_topic, reliable)

        image_qos = qos_profile_sensor_data if p.image_qos == 'sensor' else QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
        image_type = CompressedImage if p.image_transport == 'compressed' else Image
        self.image_sub = self.create_subscription(image_type, p.image_topic, self._on_image,
                                                  image_qos)
        if p.prior_source == 'odometry':
            self.create_subscription(Odometry, p.prior_topic, self._on_prior_odometry,
                                     qos_profile_sensor_data)
        elif p.prior_source == 'navsatfix':
            self.create_subscription(NavSatFix, p.prior_topic, self._on_prior_fix,
                                     qos_profile_sensor_data)
        if p.heading_source == 'imu':
            self.create_subscription(Imu, p.heading_topic, self._on_heading_imu,
                                     qos_profile_sensor_data)
        elif p.heading_source == 'odometry':
            self.create_subscription(Odometry, p.heading_topic, self._on_heading_odometry,
                                     qos_profile_sensor_data)
        self.diag_timer = self.create_timer(p.diagnostics_period_s, self.publish_diagnostics)

        self._worker = threading.Thread(target=self._run, name='geozoom-localize', daemon=True)
        self._worker.start()
        backend = getattr(localizer.backend, 'name', type(localizer.backend).__name__)
        self.get_logger().info(
            f'localizing {p.image_topic} ({p.image_transport}, {self.converter_name}) on '
            f'{localizer.bundle.path} with {backend} {p.method} (beam {p.beam_width}) at most '
            f'{p.max_rate_hz:g} Hz; prior {p.prior_source}, heading {p.heading_source}; '
            f'gate confidence >= {self._gate.describe(p.method)}; '
            f'fixes on {p.fix_topic}')

    def destroy_node(self):
        """Stop the worker thread, then destroy the node."""
        self._stop.set()
        slot = getattr(self, '_slot', None)
        if slot is not None:
            slot.wake()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=10.0)
        return super().destroy_node()

    # -- callbacks (executor thread: never block) -------------------------------------------

    def _on_image(self, msg):
        now = time.monotonic()
        with self._lock:
            self.stats['frames_received'] += 1
            self._arrivals.append(now)
            while self._arrivals and now - self._arrivals[0] > RATE_WINDOW_S:
                self._arrivals.popleft()
        if self._slot.put((msg, now)):
            with self._lock:
                self.stats['frames_dropped'] += 1

    def _on_prior_odometry(self, msg):
        p = self.params
        frame_id = msg.header.frame_id.lstrip('/')
        if frame_id and frame_id != p.pose_frame_id:
            self._prior = _Stamped(None, time.monotonic(), f'odometry prior is in frame '
                                   f'{frame_id!r}, not the map frame {p.pose_frame_id!r} '
                                   '(pose_frame_id)')
            self._problem('prior', f'bad prior ignored: {self._prior.error}')
            return
        self._set_prior(lambda: prior_from_odometry(msg, self.frame, p.datum_yaw,
                                                    p.prior_min_sigma_m))

    def _on_prior_fix(self, msg):
        self._set_prior(lambda: prior_from_navsatfix(msg, self.params.prior_min_sigma_m))

    def _set_prior(self, make):
        now = time.monotonic()
        try:
            self._prior = _Stamped(make(), now)
        except InputError as exc:
            self._prior = _Stamped(None, now, str(exc))
            self._problem('prior', f'bad prior ignored: {exc}')

    def _on_heading_imu(self, msg):
        if len(msg.orientation_covariance) and msg.orientation_covariance[0] == -1.0:
            self._problem('heading', 'IMU gives no orientation (orientation_covariance[0] = '
                          '-1); heading-free mode')
            return
        o = msg.orientation
        self._set_heading(o.x, o.y, o.z, o.w, 0.0)

    def _on_heading_odometry(self, msg):
        o = msg.pose.pose.orientation
        self._set_heading(o.x, o.y, o.z, o.w, self.params.datum_yaw)

    def _set_heading(self, x, y, z, w, yaw_offset):
        try:
            yaw = yaw_from_quaternion(x, y, z, w) + yaw_offset
        except InputError as exc:
            self._problem('heading', f'bad heading ignored: {exc}')
            return
        self._heading = _Stamped(compass_heading_deg(yaw, self.params.camera_yaw_offset_deg),
                                 time.monotonic())

    def _problem(self, kind, message):
        """Count a bad input, keep it for diagnostics and log it (throttled)."""
        key = _COUNTERS.get(kind)
        with self._lock:
            if key:
                self.stats[key] += 1
            self._problems[kind] = (time.monotonic(), message)
            self._problem_since_diag = True
        allowed, suppressed = self._throttle.ready(kind)
        if allowed:
            more = f' ({suppressed} similar suppressed)' if suppressed else ''
            self.get_logger().warning(message + more)

    # -- the worker --------------------------------------------------------------------------

    def _run(self):
        period = 1.0 / self.params.max_rate_hz
        next_start = 0.0
        while not self._stop.is_set():
            delay = next_start - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            item = self._slot.take(timeout=0.1)
            if item is None or self._stop.is_set():
                continue
            next_start = time.monotonic() + period
            try:
                self._process(*item)
            except Exception as exc:  # noqa: B902 - a frame must never stop the node
                self._problem('error', f'frame failed: {type(exc).__name__}: '
                              f'{P._one_line(exc)}')

    def _current_heading(self, now):
        """Return ``(heading degrees or None, mode)`` for the frame being processed."""
        p = self.params
        if not self.localizer.uses_heading:
            return None, 'unused (the search takes no heading)'
        if p.heading_source == 'none':
            return None, 'heading-free (heading_source none)'
        h = self._heading
        if h is None:
            return None, f'heading-free (no heading on {p.heading_topic} yet)'
        age = now - h.t
        if age > p.heading_max_age_s:
            return None, f'heading-free (heading {age:.1f} s old)'
        return h.value, f'{p.heading_source}'

    def _current_prior(self, now):
        """Return ``(prior or None, usable, mode)``; ``usable`` False means: no fix."""
        p = self.params
        if p.prior_source == 'none':
            return None, True, 'off'
        st = self._prior
        if st is None:
            return None, True, 'whole map (no prior yet)'
        age = now - st.t
        if age > p.prior_max_age_s:
            return None, True, f'whole map (prior {age:.1f} s old)'
        if st.value is None:
            return None, False, f'invalid prior: {st.error}'
        if self._monitor.whole_map:
            return st.value, True, 'whole map (fixes disagreed with the prior)'
        return st.value, True, 'prior'

    def _process(self, msg, t_recv):
        try:
            self._localize_and_publish(msg, t_recv)
        finally:
            with self._lock:
                self.stats['frames_processed'] += 1

    def _localize_and_publish(self, msg, t_recv):
        p = self.params
        t0 = time.monotonic()
        try:
            rgb = self.convert(msg)
        except InputError as exc:
            self._problem('image', f'bad image on {p.image_topic} dropped: {exc}')
            return
        heading, self.heading_mode = self._current_heading(t0)
        prior, usable, self.prior_mode = self._current_prior(t0)
        if not usable:
            self._problem('prior_block', f'no fix: {self.prior_mode}')
            return
        search_prior = None if (prior is None or self._monitor.whole_map) else prior
        try:
            fix = self._localize(rgb, heading, search_prior)
        except InputError as exc:
            if search_prior is not None and 'prior' in str(exc):
                self._problem('prior_block', f'no fix: {exc}')
                self._observe_prior(False)
            elif heading is None and self.localizer.heading_input:
                self._problem('heading', f'no fix: {self.heading_mode}, and the backend '
                              f'cannot run this model without a heading ({exc})')
            else:
                self._problem('image', f'bad image on {p.image_topic} dropped: {exc}')
            return
        if fix is None:
            with self._lock:
                self.stats['no_cell_reached'] += 1
            self._problem('search', 'no fix: the search reached no cell with imagery')
            if search_prior is not None:
                self._observe_prior(False)
            return
        try:
            gated_in, sigma, cov = self._gate.passes(fix.confidence, fix.cov_en, fix.method)
        except InputError as exc:
            self._problem('error', f'no fix: {exc}')
            return
        if prior is not None:
            self._observe_prior(gated_in and self._gate.agrees_with(prior, fix.lat, fix.lon))
        self._publish(msg.header.stamp, fix, cov, gated_in)
        t1 = time.monotonic()
        lag_ns = self.get_clock().now().nanoseconds - stamp_ns(msg.header.stamp)
        with self._lock:
            self.stats['fixes_published' if gated_in else 'fixes_gated_out'] += 1
            self._latency_ms.append((t1 - t0) * 1e3)
            self._publish_latency_ms.append((t1 - t_recv) * 1e3)
            self._stamp_latency_ms.append(lag_ns / 1e6)
            self._last_fix = (t1, fix, gated_in, sigma)

    def _observe_prior(self, agrees):
        if self._monitor.observe(agrees):
            if self._monitor.whole_map:
                with self._lock:
                    self.stats['prior_fallbacks'] += 1
                self._problem('prior_fallback', f'{self.params.prior_disagree_count} fixes in a '
                              'row disagreed with the prior: searching the whole map')
            else:
                self.get_logger().info('fixes agree with the prior again: prior search resumed')

    def _localize(self, rgb, heading, prior):
        # Without a heading, a heading model runs in its heading-free mode (see localize()).
        return self.localizer.localize(rgb, heading_deg=heading, prior=prior)

    # -- output ------------------------------------------------------------------------------

    def _local_xy(self, lat, lon):
        """Return pose-frame ``(x, y)`` metres and the rotation (radians) ENU -> pose frame."""
        if self.params.pose_frame == 'utm':
            e, n, _ = latlon_to_utm(lat, lon, self.utm_epsg)
            return float(e), float(n), 0.0
        east, north, _ = self.frame.to_enu(lat, lon, 0.0)
        yaw = self.params.datum_yaw
        c, s = math.cos(yaw), math.sin(yaw)
        return c * east + s * north, -s * east + c * north, -yaw

    def _publish(self, stamp, fix, cov, gated_in):
        p = self.params
        out = NavSatFix()
        out.header.stamp = stamp
        out.header.frame_id = p.fix_frame_id
        out.status.status = NavSatStatus.STATUS_FIX if gated_in else NavSatStatus.STATUS_NO_FIX
        out.status.service = p.fix_service
        out.latitude = float(fix.lat)
        out.longitude = float(fix.lon)
        out.altitude = float(p.fix_altitude_m)
        cov9 = np.zeros((3, 3))
        cov9[:2, :2] = cov
        cov9[2, 2] = UNKNOWN_VARIANCE
        out.position_covariance = [float(v) for v in cov9.ravel()]
        out.position_covariance_type = NavSatFix.COVARIANCE_TYPE_APPROXIMATED
        self.fix_pub.publish(out)

        if self.pose_pub is None and self.hyp_pub is None:
            return
        x, y, rot = self._local_xy(fix.lat, fix.lon)
        if self.pose_pub is not None and gated_in:
            pose = PoseWithCovarianceStamped()
            pose.header.stamp = stamp
            pose.header.frame_id = p.pose_frame_id
            pose.pose.pose.position.x, pose.pose.pose.position.y = x, y
            pose.pose.pose.orientation.w = 1.0
            cov6 = np.diag([0.0, 0.0] + [UNKNOWN_VARIANCE] * 4)
            cov6[:2, :2] = rotate_cov(cov, rot)
            pose.pose.covariance = [float(v) for v in cov6.ravel()]
            self.pose_pub.publish(pose)
        if self.hyp_pub is not None:
            arr = PoseArray()
            arr.header.stamp = stamp
            arr.header.frame_id = p.pose_frame_id
            for h in fix.hypotheses[:p.max_hypotheses]:
                hx, hy, _ = self._local_xy(*h.center)
                pose = Pose()
                pose.position.x, pose.position.y = hx, hy
                pose.position.z = float(h.prob)  # for display: height = probability
                pose.orientation.w = 1.0
                arr.poses.append(pose)
            self.hyp_pub.publish(arr)

    def diagnostics(self):
        """Return the node's ``diagnostic_msgs/DiagnosticStatus`` (input, latency, modes)."""
        p = self.params
        now = time.monotonic()
        with self._lock:
            stats = dict(self.stats)
            arrivals = list(self._arrivals)
            lat = np.array(self._latency_ms)
            pub = np.array(self._publish_latency_ms)
            lag = np.array(self._stamp_latency_ms)
            last = self._last_fix
            problems = dict(self._problems)
            fresh_problem = self._problem_since_diag
            self._problem_since_diag = False
        arrivals = [t for t in arrivals if now - t <= RATE_WINDOW_S]
        rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) \
            if len(arrivals) > 1 and arrivals[-1] > arrivals[0] else 0.0
        backend = getattr(self.localizer.backend, 'name', type(self.localizer.backend).__name__)
        values = {
            'input_rate_hz': f'{rate:.2f}',
            'max_rate_hz': f'{p.max_rate_hz:g}',
            **{k: str(v) for k, v in stats.items()},
            'queue_pending': str(self._slot.pending()),
            'processing_latency_ms_mean': f'{lat.mean():.1f}' if lat.size else 'n/a',
            'processing_latency_ms_p95': f'{np.percentile(lat, 95):.1f}' if lat.size else 'n/a',
            'receive_to_publish_ms_p95': f'{np.percentile(pub, 95):.1f}' if pub.size else 'n/a',
            'stamp_to_publish_ms_p95': f'{np.percentile(lag, 95):.1f}' if lag.size else 'n/a',
            'last_confidence': f'{last[1].confidence:.3f}' if last else 'n/a',
            'last_sigma_m': f'{last[3]:.1f}' if last else 'n/a',
            'last_fix_status': ('FIX' if last[2] else 'NO_FIX') if last else 'n/a',
            'age_of_last_fix_s': f'{now - last[0]:.2f}' if last else 'n/a',
            'backend': backend,
            'method': p.method,
            'gate_min_confidence': self._gate.describe(p.method),
            'image_converter': self.converter_name,
            'heading_mode': self.heading_mode,
            'prior_mode': self.prior_mode,
        }
        for kind, (t, text) in sorted(problems.items()):
            values[f'last_{kind}_problem'] = f'{text} ({now - t:.1f} s ago)'
        st = DiagnosticStatus()
        st.name = f'{self.get_name()}: visual geo-localization'
        st.hardware_id = str(self.localizer.bundle.path)
        degraded = 'heading-free' in self.heading_mode and self.localizer.uses_heading
        fallback = self._monitor.whole_map and p.prior_source != 'none'
        if fresh_problem or fallback or degraded:
            st.level = DiagnosticStatus.WARN
            recent = max(problems.items(), key=lambda kv: kv[1][0])[1][1] if problems else ''
            st.message = recent if fresh_problem else (
                'searching the whole map: fixes disagreed with the prior'
                if fallback else self.heading_mode)
        elif last is None:
            st.level = DiagnosticStatus.OK
            st.message = 'waiting for frames'
        else:
            st.level = DiagnosticStatus.OK
            st.message = 'localizing'
        st.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        return st

    def publish_diagnostics(self):
        """Publish the diagnostics (timer callback)."""
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [self.diagnostics()]
        self.diag_pub.publish(msg)


def main(args=None):
    """Run ``geozoom_node`` until SIGINT/SIGTERM; return the exit status (2 = bad start-up)."""
    rclpy.init(args=args)
    node = None
    status = 0
    try:
        node = GeoZoomNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except GeoZoomError as exc:
        print(f'{P.NODE_NAME}: error: {exc}', file=sys.stderr, flush=True)
        status = 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return status


if __name__ == '__main__':
    sys.exit(main())
