"""Launch geozoom_node, and with use_ekf:=true robot_localization's fusion around it.

Arguments (``ros2 launch geozoom_ros localize.launch.py map:=... model:=...``):

- ``map``: map bundle folder (``geozoom index`` output); required.
- ``model``: model folder the bundle was built with; required.
- ``image_topic``: camera topic (default /camera/image_raw; for a CompressedImage topic set
  ``image_transport: compressed`` in the parameters file).
- ``use_ekf``: also start robot_localization: ``ekf_node`` twice (REP-105: ``ekf_odom`` in
  the odom frame, ``ekf_map`` in the map frame) and ``navsat_transform_node`` (default false).
- ``retrieval_model``: a retrieval model folder; when given, the node runs the fused search
  (``method: zoom-fused``) and the bundle must hold that model's crop embeddings
  (``geozoom index --with-retrieval``). Default: the parameters file's method.
- ``params_file``: geozoom_node's parameters (default: the installed config/localize.yaml).
- ``datum``: ``"lat,lon"`` or ``"lat,lon,yaw"`` (degrees, degrees, radians counter-clockwise
  from east) of the map frame's origin; default: the centre of the map bundle.

With use_ekf:=true the geozoom fix reaches ekf_map only through navsat_transform_node
(``/geozoom/fix`` -> ``/odometry/gps``), where ``odom1_pose_rejection_threshold`` in
config/ekf.yaml gates it by Mahalanobis distance; navsat_transform_node waits for the datum
given here (``wait_for_datum: true``), so a bad first fix cannot move the map frame, and
geozoom_node gets the same datum for its local frame and odometry prior.

The node list is planned by :func:`plan` (plain data, no launch imports), which the tests check
without a ROS install; :func:`generate_launch_description` turns it into launch_ros actions.
"""

import os

PACKAGE = 'geozoom_ros'
#: Launch arguments: name -> (default, description).
ARGUMENTS = {
    'map': ('', 'map bundle folder written by geozoom index (required)'),
    'model': ('', 'model folder the bundle was built with (required)'),
    'image_topic': ('/camera/image_raw', 'camera topic'),
    'use_ekf': ('false', 'also start robot_localization (two ekf_node, navsat_transform_node)'),
    'retrieval_model': ('', 'retrieval model folder: run the fused search (method zoom-fused) '
                            'with it'),
    'params_file': ('', 'geozoom_node parameters (default: config/localize.yaml)'),
    'datum': ('', '"lat,lon[,yaw]" of the map frame origin (default: the map centre)'),
}


def _truthy(text):
    value = str(text).strip().lower()
    if value in ('true', '1', 'yes', 'on'):
        return True
    if value in ('false', '0', 'no', 'off', ''):
        return False
    raise ValueError(f'use_ekf:={text} must be true or false')


def plan(values, share_dir):
    """Return the nodes to start as dicts of launch_ros ``Node`` keyword arguments.

    ``values`` maps the argument names of :data:`ARGUMENTS` to strings; ``share_dir`` is the
    package's installed share folder (holding config/). Raises a one-line error for a missing
    map or model or a bad datum.
    """
    from geozoom_ros.ros import params as P
    from geozoom_ros.ros import topics

    config = os.path.join(share_dir, 'config')
    params_file = values.get('params_file') or os.path.join(config, 'localize.yaml')
    base = P.load_yaml(params_file, require_paths=False)  # a bad file stops here, one line
    bundle, model = values.get('map', ''), values.get('model', '')
    if not bundle or not model:
        raise P.ConfigError('give map:=BUNDLE_FOLDER and model:=MODEL_FOLDER')
    use_ekf = _truthy(values.get('use_ekf', 'false'))
    overrides = {'bundle': bundle, 'model': model,
                 'image_topic': values.get('image_topic') or base.image_topic}
    if values.get('retrieval_model'):
        overrides.update(method='zoom-fused', retrieval_model=values['retrieval_model'])
    nodes = []
    if use_ekf:
        if values.get('datum'):
            lat, lon, yaw = P.parse_datum(values['datum'])
        else:
            lat, lon = P.map_center(bundle)
            yaw = 0.0
        overrides.update(datum_source='parameters', datum_latitude=lat, datum_longitude=lon,
                         datum_yaw=yaw)
        ekf = os.path.join(config, 'ekf.yaml')
        nodes += [
            dict(package='robot_localization', executable='ekf_node', name='ekf_odom',
                 output='screen', parameters=[ekf],
                 remappings=[('odometry/filtered', topics.ODOMETRY_LOCAL)]),
            dict(package='robot_localization', executable='ekf_node', name='ekf_map',
                 output='screen', parameters=[ekf],
                 remappings=[('odometry/filtered', topics.ODOMETRY_GLOBAL)]),
            dict(package='robot_localization', executable='navsat_transform_node',
                 name='navsat_transform', output='screen',
                 parameters=[os.path.join(config, 'navsat_transform.yaml'),
                             {'wait_for_datum': True, 'datum': [lat, lon, yaw]}],
                 remappings=[('gps/fix', base.fix_topic),
                             ('imu', topics.IMU),
                             ('odometry/filtered', topics.ODOMETRY_GLOBAL),
                             ('odometry/gps', topics.ODOMETRY_GPS),
                             ('gps/filtered', topics.GPS_FILTERED)]),
        ]
    P.NodeParams.from_dict({**base.to_dict(), **overrides}, where='launch arguments')
    nodes.insert(0, dict(package=PACKAGE, executable='geozoom_node', name=P.NODE_NAME,
                         output='screen', parameters=[params_file, overrides]))
    return nodes


def _launch_setup(context, *args, **kwargs):
    from ament_index_python.packages import get_package_share_directory
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    values = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    return [Node(**spec) for spec in plan(values, get_package_share_directory(PACKAGE))]


def generate_launch_description():
    """Return the launch description (arguments, then the nodes planned at launch time)."""
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()]
        + [OpaqueFunction(function=_launch_setup)])
