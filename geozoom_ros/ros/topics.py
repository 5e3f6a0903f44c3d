"""Default topic names of geozoom_node and of the robot_localization graph around it.

One place for every name, so the node, the launch file, the configs, the tests and the
benchmark agree. Each is a parameter default; remap or override it per robot.
"""

#: Camera frames, ``sensor_msgs/Image`` (image_transport's raw name).
IMAGE_RAW = '/camera/image_raw'
#: The same frames compressed, ``sensor_msgs/CompressedImage`` (image_transport's name).
IMAGE_COMPRESSED = '/camera/image_raw/compressed'
#: Earth-referenced IMU, ``sensor_msgs/Imu`` (a heading source).
IMU = '/imu/data'
#: Wheel or visual odometry, ``nav_msgs/Odometry`` in the odom frame (fused by the EKFs).
ODOM = '/odom'

#: The node's position fix, ``sensor_msgs/NavSatFix`` (navsat_transform_node's input).
FIX = '/geozoom/fix'
#: The fix as ``geometry_msgs/PoseWithCovarianceStamped`` in the local or UTM frame.
POSE = '/geozoom/pose'
#: The top hypotheses, ``geometry_msgs/PoseArray`` (for visualisation).
HYPOTHESES = '/geozoom/hypotheses'
#: ``diagnostic_msgs/DiagnosticArray``, the ROS-wide diagnostics topic.
DIAGNOSTICS = '/diagnostics'

#: robot_localization: the odom-frame EKF output (continuous, drifts).
ODOMETRY_LOCAL = '/odometry/local'
#: robot_localization: the map-frame EKF output (the node's odometry prior).
ODOMETRY_GLOBAL = '/odometry/global'
#: robot_localization: navsat_transform_node's fix converted to map-frame odometry.
ODOMETRY_GPS = '/odometry/gps'
#: robot_localization: navsat_transform_node's filtered fix (a NavSatFix prior).
GPS_FILTERED = '/gps/filtered'
