"""geozoom_ros: GPS-denied visual geo-localization by a learned zoom policy.

The package root imports nothing heavy: torch and rclpy are imported only by the modules that
need them (model/, runtime/, train/, ros/).
"""

__version__ = '0.1.0'
