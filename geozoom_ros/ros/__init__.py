"""ROS 2 glue: message conversions, bag replay and the localization node."""
