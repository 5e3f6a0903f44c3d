"""Parameters of ``geozoom_node``: one dataclass, the single source of truth.

:class:`NodeParams` lists every parameter with its type, default, unit and allowed values. The
node declares its ROS parameters from these fields (with ``ParameterDescriptor`` s), the YAML
file ``config/localize.yaml`` holds the same keys, and :meth:`NodeParams.validate` checks
them all. Unknown keys are errors; a bad value is a :class:`~geozoom_ros.errors.ConfigError`
with one line naming the parameter, the problem and the fix.

Frames: ``datum_*`` anchor the local East-North-Up frame (REP-103) that the odometry prior and
the local pose output use. The map frame of robot_localization is that ENU frame turned by
``datum_yaw`` (radians, counter-clockwise from east), as navsat_transform_node's ``datum``.

rclpy is imported only by the functions that talk to a node.
"""

from dataclasses import asdict, dataclass, field, fields
import math
from pathlib import Path

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.ros import topics
from geozoom_ros.search import DEFAULT_ZOOM_WEIGHT

#: The node's name (and the key of its section in a ROS parameters file).
NODE_NAME = 'geozoom_node'

BACKENDS = ('auto', 'torch', 'onnxruntime', 'tensorrt')
METHODS = ('zoom-beam', 'zoom', 'zoom-fused')
TRANSPORTS = ('raw', 'compressed')
IMAGE_QOS = ('sensor', 'reliable')
CONVERTERS = ('auto', 'cv_bridge', 'own')
PRIOR_SOURCES = ('none', 'odometry', 'navsatfix')
HEADING_SOURCES = ('none', 'imu', 'odometry')
POSE_FRAMES = ('local', 'utm')
DATUM_SOURCES = ('map_center', 'parameters')
GATE_SOURCES = ('calibration', 'parameters')

#: Parameters every rclpy node may have besides ours (set by the launch system or rclpy).
ROS_RESERVED = frozenset({'use_sim_time', 'start_type_description_service'})


def _p(default, description, choices=None, low=None, high=None, low_open=False):
    """Return a dataclass field carrying its documentation and limits in ``metadata``."""
    return field(default=default, metadata={
        'description': description, 'choices': choices, 'low': low, 'high': high,
        'low_open': low_open})


@dataclass
class NodeParams:
    """Every parameter of ``geozoom_node`` (units in the descriptions)."""

    bundle: str = _p('', 'map bundle folder written by geozoom index (required)')
    model: str = _p('', 'model folder the bundle was built with (required)')
    backend: str = _p('auto', 'inference backend', BACKENDS)
    device: str = _p('', "torch device, e.g. 'cpu' or 'cuda' ('' = the backend's default)")
    method: str = _p('zoom-beam', 'search: zoom-beam (beam search), zoom (greedy) or '
                                  'zoom-fused (beam search weighed by retrieval_model)',
                     METHODS)
    beam_width: int = _p(8, 'hypotheses kept per zoom level by the beam search', low=1,
                         high=256)
    retrieval_model: str = _p('', 'zoom-fused: the retrieval model whose crop embeddings the '
                                  'bundle holds (geozoom index --with-retrieval)')
    zoom_weight: float = _p(DEFAULT_ZOOM_WEIGHT, "zoom-fused: the decoder's weight against "
                            'the retrieval evidence (0 = retrieval alone)', low=0.0,
                            high=100.0)
    calibration: str = _p('auto', "covariance calibration: 'auto' (the model folder's "
                                  "calibration.json when present), 'none', or a file path")
    cov_scale: float = _p(1.0, 'factor applied to the search covariance (calibration)',
                          low=0.0, low_open=True, high=1e6)
    max_roots: int = _p(4, 'on maps with more root cells, search only this many, ranked by '
                           'the cross-view embedding (0 = every root)', low=0, high=1 << 20)
    shortlist_level: int = _p(1, 'token level whose cells rank the roots (1 = 16 per root)',
                              low=0, high=16)

    image_topic: str = _p(topics.IMAGE_RAW, 'camera topic (Image, or CompressedImage with '
                                            'transport compressed)')
    image_transport: str = _p('raw', 'raw: sensor_msgs/Image; compressed: '
                                     'sensor_msgs/CompressedImage (JPEG or PNG)', TRANSPORTS)
    image_qos: str = _p('sensor', 'camera subscription QoS: sensor (best effort, as camera '
                                  'drivers publish) or reliable', IMAGE_QOS)
    image_converter: str = _p('auto', 'image decoding: auto (cv_bridge where installed, '
                                      'else the package converter), cv_bridge or own',
                              CONVERTERS)
    max_rate_hz: float = _p(5.0, 'most frames localised per second (Hz); newer frames replace '
                                 'waiting ones', low=0.0, low_open=True, high=1000.0)

    gate_source: str = _p('calibration', 'confidence gate: calibration (the threshold '
                                         'geozoom calibrate fitted for the search that ran, '
                                         'min_confidence where it fitted none) or parameters '
                                         '(min_confidence always)', GATE_SOURCES)
    min_confidence: float = _p(0.6, 'fixes below this confidence (0..1) are published as '
                                    'NO_FIX', low=0.0, high=1.0)
    max_sigma_m: float = _p(150.0, 'fixes with a 1-sigma radius above this (metres) are '
                                   'published as NO_FIX', low=0.0, low_open=True)

    fix_topic: str = _p(topics.FIX, 'sensor_msgs/NavSatFix output')
    fix_frame_id: str = _p('base_link', 'frame_id of the NavSatFix (where the camera is)')
    fix_altitude_m: float = _p(0.0, 'altitude written into every NavSatFix (metres, WGS84; '
                                    'the camera cannot observe it)', low=-1000.0, high=10000.0)
    fix_service: int = _p(1, 'NavSatStatus.service bitmask written into every fix (1 = GPS)',
                          low=0, high=15)
    pose_topic: str = _p(topics.POSE, 'geometry_msgs/PoseWithCovarianceStamped output '
                                      "('' = none)")
    pose_frame: str = _p('local', 'pose coordinates: local (ENU about the datum, turned by '
                                  'datum_yaw) or utm (the datum zone)', POSE_FRAMES)
    pose_frame_id: str = _p('map', 'frame_id of the pose output')
    hypotheses_topic: str = _p(topics.HYPOTHESES, 'geometry_msgs/PoseArray of the top '
                                                  "hypotheses ('' = none)")
    max_hypotheses: int = _p(8, 'hypotheses published on hypotheses_topic', low=1, high=1000)
    diagnostics_topic: str = _p(topics.DIAGNOSTICS, 'diagnostic_msgs/DiagnosticArray output')
    diagnostics_period_s: float = _p(1.0, 'diagnostics publishing period (seconds)',
                                     low=0.0, low_open=True, high=3600.0)
    warn_throttle_s: float = _p(5.0, 'the same kind of warning is logged at most once per '
                                     'this many seconds', low=0.0, high=3600.0)

    datum_source: str = _p('map_center', 'origin of the local frame: map_center (centre of '
                                         'the bundle) or parameters (datum_latitude/longitude)',
                           DATUM_SOURCES)
    datum_latitude: float = _p(0.0, 'datum latitude (degrees, WGS84)', low=-85.0, high=85.0)
    datum_longitude: float = _p(0.0, 'datum longitude (degrees, WGS84)', low=-180.0,
                                high=180.0)
    datum_yaw: float = _p(0.0, 'yaw of the map frame x axis (radians, counter-clockwise from '
                               'east), as navsat_transform_node datum', low=-2 * math.pi,
                          high=2 * math.pi)

    prior_source: str = _p('none', 'search prior: none, odometry (nav_msgs/Odometry in the '
                                   'map frame) or navsatfix', PRIOR_SOURCES)
    prior_topic: str = _p(topics.ODOMETRY_GLOBAL, 'topic of the prior')
    prior_max_age_s: float = _p(1.0, 'a prior older than this (seconds since it arrived) is '
                                     'not used', low=0.0, low_open=True, high=3600.0)
    prior_min_sigma_m: float = _p(10.0, 'floor of the prior 1-sigma (metres): keeps an '
                                        'overconfident filter from shrinking the search',
                                  low=0.0, low_open=True, high=1e6)
    prior_disagree_count: int = _p(3, 'this many consecutive fixes disagreeing with the prior '
                                      'switch to whole-map search', low=1, high=10000)
    prior_disagree_sigmas: float = _p(2.0, 'a fix farther than this many prior sigmas '
                                           '(Mahalanobis) disagrees', low=0.0, low_open=True,
                                      high=100.0)

    heading_source: str = _p('none', 'camera heading: none, imu (earth-referenced '
                                     'sensor_msgs/Imu) or odometry (map-frame '
                                     'nav_msgs/Odometry)', HEADING_SOURCES)
    heading_topic: str = _p(topics.IMU, 'topic of the heading source')
    heading_max_age_s: float = _p(0.5, 'an older heading is not used (heading-free mode) '
                                       '(seconds)', low=0.0, low_open=True, high=3600.0)
    camera_yaw_offset_deg: float = _p(0.0, 'camera heading minus vehicle heading (degrees, '
                                           'clockwise)', low=-360.0, high=360.0)

    @classmethod
    def names(cls):
        """Return the parameter names in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def describe(cls, name):
        """Return the metadata dict (description, choices, low, high) of one parameter."""
        for f in fields(cls):
            if f.name == name:
                return dict(f.metadata)
        raise ConfigError(f'parameter {name!r} is unknown')

    @classmethod
    def from_dict(cls, data, where='parameters', require_paths=True):
        """Build validated parameters from a mapping; unknown keys or bad values raise.

        ``require_paths=False`` accepts an empty ``bundle``/``model`` (a parameters file whose
        paths come from launch arguments).
        """
        if not isinstance(data, dict):
            raise ConfigError(f'{where}: expected a mapping of parameters, got '
                              f'{type(data).__name__}')
        names = set(cls.names())
        unknown = sorted(set(data) - names - ROS_RESERVED)
        if unknown:
            raise ConfigError(f'{where}: unknown parameter(s) {", ".join(unknown)}; valid: '
                              f'{", ".join(cls.names())}')
        defaults = cls()
        kwargs = {}
        for name, value in data.items():
            if name in ROS_RESERVED:
                continue
            kwargs[name] = _coerce(name, value, getattr(defaults, name), where)
        params = cls(**kwargs)
        params.validate(where, require_paths=require_paths)
        return params

    def to_dict(self):
        """Return a plain dict of every parameter."""
        return asdict(self)

    def replace(self, **changes):
        """Return a validated copy with some parameters changed."""
        return NodeParams.from_dict({**self.to_dict(), **changes})

    def validate(self, where='parameters', check_files=False, require_paths=True):
        """Raise ConfigError (one line naming the parameter) unless every value is valid.

        ``bundle`` and ``model`` must be set unless ``require_paths`` is false; with
        ``check_files`` they must exist as well (InputError otherwise).
        """
        for f in fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if meta['choices'] and value not in meta['choices']:
                raise ConfigError(f'{where}: {f.name}={value!r} is not one of '
                                  f'{", ".join(meta["choices"])}')
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f'{where}: {f.name}={value} must be a finite number')
            low, high = meta['low'], meta['high']
            if low is not None and (value <= low if meta['low_open'] else value < low):
                rel = '>' if meta['low_open'] else '>='
                raise ConfigError(f'{where}: {f.name}={value} must be {rel} {low}')
            if high is not None and value > high:
                raise ConfigError(f'{where}: {f.name}={value} must be <= {high}')
        for name in ('bundle', 'model') if require_paths or check_files else ():
            if not getattr(self, name):
                raise ConfigError(f'{where}: {name} is not set; give the map bundle and model '
                                  'folders (bundle:=..., model:=...)')
        for name in ('image_topic', 'fix_topic', 'diagnostics_topic', 'fix_frame_id',
                     'pose_frame_id'):
            if not getattr(self, name).strip():
                raise ConfigError(f'{where}: {name} is empty; give a name')
        if self.prior_source != 'none' and not self.prior_topic:
            raise ConfigError(f'{where}: prior_topic is empty but prior_source is '
                              f'{self.prior_source}; give the topic')
        if self.method == 'zoom-fused' and not self.retrieval_model:
            raise ConfigError(f'{where}: retrieval_model is not set but method is zoom-fused; '
                              'give the retrieval model folder the bundle was indexed with')
        if self.heading_source != 'none' and not self.heading_topic:
            raise ConfigError(f'{where}: heading_topic is empty but heading_source is '
                              f'{self.heading_source}; give the topic')
        if check_files:
            names = ('bundle', 'model') + (('retrieval_model',)
                                           if self.method == 'zoom-fused' else ())
            for name in names:
                path = Path(getattr(self, name)).expanduser()
                if not path.exists():
                    raise InputError(f'{where}: {name} {path} does not exist; give an existing '
                                     f'{"map bundle" if name == "bundle" else "model"} folder')


def _coerce(name, value, default, where):
    """Check one value against the type of its default; ints are accepted for floats."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = {bool: 'true or false', int: 'an integer', float: 'a number',
                str: 'a string'}[type(default)]
        raise ConfigError(f'{where}: {name} must be {kind}, got {value!r}')
    return value


def load_yaml(path, node_name=NODE_NAME, require_paths=True):
    """Read parameters from a ROS parameters YAML file; return :class:`NodeParams`.

    Accepts the ROS layout (``<node name or /**>: ros__parameters: {...}``) or a plain mapping
    of parameters. Unknown keys, other nodes' sections only, or bad values raise ConfigError;
    ``require_paths`` as for :meth:`NodeParams.from_dict`.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f'parameters file {path}: {exc.strerror}; give an existing YAML file') \
            from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, 'problem_mark', None), 'line', None)
        at = f' at line {line + 1}' if line is not None else ''
        raise ConfigError(f'parameters file {path} is not valid YAML{at}; fix its syntax') \
            from None
    return NodeParams.from_dict(ros_section(data, path, node_name), where=str(path),
                                require_paths=require_paths)


def ros_section(data, path, node_name=NODE_NAME):
    """Return the parameter mapping of ``node_name`` in a parsed ROS parameters file."""
    if not isinstance(data, dict):
        raise ConfigError(f'parameters file {path} holds no mapping; see config/localize.yaml')
    if not any(isinstance(v, dict) and 'ros__parameters' in v for v in data.values()):
        return data
    merged = {}
    found = False
    for key, section in data.items():
        name = str(key).lstrip('/')
        if name in ('**', node_name, f'**/{node_name}') and isinstance(section, dict):
            inner = section.get('ros__parameters')
            if not isinstance(inner, dict):
                raise ConfigError(f'parameters file {path}: section {key} has no '
                                  'ros__parameters mapping')
            merged.update(inner)
            found = True
    if not found:
        raise ConfigError(f'parameters file {path} has no section for {node_name} (or /**); '
                          'see config/localize.yaml')
    return merged


# --------------------------------------------------------------------------------------------
# ROS parameters

def _ros_type(default):
    from rcl_interfaces.msg import ParameterType
    if isinstance(default, bool):
        return ParameterType.PARAMETER_BOOL
    if isinstance(default, int):
        return ParameterType.PARAMETER_INTEGER
    if isinstance(default, float):
        return ParameterType.PARAMETER_DOUBLE
    return ParameterType.PARAMETER_STRING


def descriptor(name):
    """Return the ``rcl_interfaces/ParameterDescriptor`` of one parameter."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    meta = NodeParams.describe(name)
    default = getattr(NodeParams(), name)
    text = meta['description']
    if meta['choices']:
        text += f' (one of: {", ".join(meta["choices"])})'
    d = ParameterDescriptor(name=name, type=_ros_type(default), description=text,
                            read_only=True)
    low, high = meta['low'], meta['high']
    # ROS ranges are closed; an open lower bound is left to validate().
    if low is not None and high is not None and not meta['low_open']:
        if isinstance(default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(low),
                                                         to_value=float(high), step=0.0)]
        elif isinstance(default, int) and not isinstance(default, bool):
            d.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=0)]
    return d


def declare(node, base=None):
    """Declare every parameter on ``node`` and return the validated :class:`NodeParams`.

    Values come from the node's overrides (``--ros-args -p`` / ``--params-file``) over
    ``base`` (default: the dataclass defaults). An override that names no parameter, has the
    wrong type or is out of range raises ConfigError with one line.
    """
    from rclpy.exceptions import InvalidParameterTypeException, ParameterException

    base = base or NodeParams()
    overrides = dict(getattr(node, '_parameter_overrides', {}) or {})
    unknown = sorted(set(overrides) - set(NodeParams.names()) - ROS_RESERVED)
    if unknown:
        raise ConfigError(f'node {node.get_name()}: unknown parameter(s) {", ".join(unknown)}; '
                          f'valid: {", ".join(NodeParams.names())}')
    values = {}
    for name in NodeParams.names():
        default = getattr(base, name)
        try:
            p = node.declare_parameter(name, default, descriptor(name))
        except InvalidParameterTypeException:
            got = overrides.get(name)
            shown = got.value if got is not None else '?'
            kind = {bool: 'true or false', int: 'an integer', float:
                    'a floating-point number (write 5.0, not 5)', str: 'a string'}[type(default)]
            raise ConfigError(f'parameter {name}={shown!r} is invalid: it must be {kind}') \
                from None
        except ParameterException as exc:
            got = overrides.get(name)
            if got is not None:  # the range check of validate() says it in its own words
                NodeParams.from_dict({**base.to_dict(), name: got.value},
                                     where=f'node {node.get_name()}')
            raise ConfigError(f'parameter {name} is invalid: {_one_line(exc)}') from None
        values[name] = p.value
    return NodeParams.from_dict(values, where=f'node {node.get_name()}')


def _one_line(exc):
    text = ' '.join(str(exc).split())
    return text[:160]


def map_center(bundle_path):
    """Return ``(lat, lon)`` degrees of the centre of a map bundle's bounds."""
    from geozoom_ros.bundle import load_bundle

    w, s, e, n = load_bundle(bundle_path).bounds
    return 0.5 * (s + n), 0.5 * (w + e)


def parse_datum(text):
    """Parse ``'lat,lon[,yaw]'`` (degrees, degrees, radians) into a 3-tuple of floats."""
    parts = [p for p in str(text).replace(' ', ',').split(',') if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or not all(math.isfinite(v) for v in values) or \
            abs(values[0]) > 85.0 or abs(values[1]) > 180.0:
        raise ConfigError(f'datum {text!r} must be "lat,lon" or "lat,lon,yaw" (degrees, '
                          'degrees, radians counter-clockwise from east)')
    return tuple(values + [0.0] * (3 - len(values)))
