"""The fusion replay: ekf.yaml reading, trajectory errors, the Mahalanobis gate, drift removal."""

import math
from pathlib import Path

import numpy as np
import pytest

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.eval import fusion as F

ROOT = Path(__file__).resolve().parents[2]


def test_reads_the_packaged_ekf_yaml():
    cfg = F.load_ekf_config(ROOT / 'config' / 'ekf.yaml')
    # ekf_map: x, y, yaw, vx, vy, vyaw entries of the 15-value diagonals.
    np.testing.assert_allclose(cfg.process_noise, [0.1, 0.1, 0.06, 0.025, 0.025, 0.02])
    np.testing.assert_allclose(cfg.initial_covariance, [1e6, 1e6, 1e-2, 1e-3, 1e-3, 1e-3])
    assert cfg.rejection_threshold == 3.0
    assert cfg.odom_topic == '/odom' and cfg.odom_fields == ('vx', 'vy', 'vyaw')
    assert cfg.imu_topic == '/imu/data' and cfg.imu_fields == ('yaw', 'vyaw')
    assert cfg.fix_topic == '/odometry/gps'
    assert F.default_ekf_config_path() is not None


def test_bad_ekf_yaml_is_one_line(tmp_path):
    p = tmp_path / 'ekf.yaml'
    p.write_text('ekf_odom:\n  ros__parameters:\n    frequency: 30.0\n')
    with pytest.raises(ConfigError, match='no ekf_map'):
        F.load_ekf_config(p)
    p.write_text('ekf_map:\n  ros__parameters:\n    process_noise_covariance: [1.0, 2.0]\n'
                 '    initial_estimate_covariance: [1.0]\n    odom0: /odom\n'
                 '    odom0_config: [true]\n')
    with pytest.raises(ConfigError, match='process_noise_covariance must hold 15') as exc:
        F.load_ekf_config(p)
    assert '\n' not in str(exc.value)
    with pytest.raises(ConfigError, match='not found|does not|No such'):
        F.load_ekf_config(tmp_path / 'missing.yaml')


def test_trajectory_errors_of_a_known_offset():
    t = np.arange(5.0)
    ref = np.column_stack([t * 10.0, np.zeros(5)])
    est = ref + [3.0, 4.0]
    e = F.trajectory_errors(t, est, t, ref)
    assert e.ate_rmse_m == pytest.approx(5.0)
    assert e.final_error_m == pytest.approx(5.0) and e.max_error_m == pytest.approx(5.0)
    # A growing offset 0, 1, 2, 3 m: RMSE sqrt(14 / 4), final 3, max 3, mean 1.5.
    est = ref[:4] + np.column_stack([np.zeros(4), np.arange(4.0)])
    e = F.trajectory_errors(t[:4], est, t, ref)
    assert e.ate_rmse_m == pytest.approx(math.sqrt(3.5))
    assert (e.final_error_m, e.max_error_m, e.mean_error_m) == pytest.approx((3.0, 3.0, 1.5))
    assert len(e.t) == 4  # the reference time 4 s lies beyond the trajectory: not scored
    # The estimate is interpolated at the reference times.
    e = F.trajectory_errors([0.0, 2.0], [[0.0, 0.0], [20.0, 2.0]], [1.0], [[10.0, 0.0]])
    assert e.final_error_m == pytest.approx(1.0)
    assert math.isnan(F.trajectory_errors([5.0, 6.0], [[0, 0], [1, 1]], [1.0], [[0, 0]])
                      .ate_rmse_m)


def test_odometry_alignment_at_the_start_pose():
    odom = _series(np.array([0.0, 1.0]), np.array([[2.0, 0.0], [3.0, 0.0]]), np.zeros(2))
    tf = F.odom_to_map_transform((2.0, 0.0, 0.0), (100.0, 50.0, math.pi / 2))
    xy = F.align_odometry(odom, tf)
    np.testing.assert_allclose(xy, [[100.0, 50.0], [100.0, 51.0]], atol=1e-9)


def _series(t, xy, yaw, vx=None, vyaw=None):
    n = len(t)
    return F.OdometrySeries(t, xy[:, 0], xy[:, 1], yaw,
                            np.zeros(n) if vx is None else vx, np.zeros(n),
                            np.zeros(n) if vyaw is None else vyaw,
                            np.tile([0.01, 1e-4, 1e-4], (n, 1)))


def _drift_scenario(seed=0, duration=120.0, bias=0.01):
    """Straight east at 10 m/s; the odometry's yaw rate has a bias: it curves away."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, duration, 0.05)
    truth = np.column_stack([10.0 * t, np.zeros_like(t)])
    wz = np.full_like(t, bias)
    yaw = bias * t
    dt = np.diff(t, prepend=0.0)
    xy = np.column_stack([np.cumsum(10.0 * np.cos(yaw) * dt), np.cumsum(10.0 * np.sin(yaw) * dt)])
    odom = _series(t, xy, yaw, vx=np.full_like(t, 10.0), vyaw=wz)
    ft = np.arange(1.0, duration, 1.0)
    fxy = np.column_stack([10.0 * ft, np.zeros_like(ft)]) + rng.normal(0.0, 10.0, (len(ft), 2))
    return odom, t, truth, ft, fxy


def _config(**kw):
    cfg = F.load_ekf_config(ROOT / 'config' / 'ekf.yaml')
    cfg.imu_topic, cfg.imu_fields = None, ()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_fusion_removes_drift_and_the_gate_rejects_a_planted_outlier():
    odom, t, truth, ft, fxy = _drift_scenario()
    k = 60
    fxy[k] = [10.0 * ft[k], 500.0]  # 500 m north of the road, confident
    fixes = F.FixInput(ft, fxy, np.tile(np.eye(2) * 100.0, (len(ft), 1, 1)))
    start = F.Pose2D(0.0, 0.0, 0.0, 0.0)
    cfg = _config()
    track = F.fuse(cfg, odom, start, fixes, position_sigma_m=2.0)
    assert not track.fix_accepted[k] and track.fix_d2[k] > 9.0
    assert track.rejected >= 1
    # Consistent fixes are accepted (a 3-sigma gate keeps about 99 % of them).
    assert track.accepted >= 0.95 * (len(ft) - 1)
    tf = F.odom_to_map_transform((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    odo = F.trajectory_errors(t, F.align_odometry(odom, tf), t, truth)
    fus = F.trajectory_errors(track.t, track.xy, t, truth)
    assert odo.final_error_m > 500.0  # 0.01 rad/s of yaw bias over 1.2 km
    assert fus.final_error_m < odo.final_error_m / 5
    assert fus.ate_rmse_m < 15.0 and fus.max_error_m < 60.0
    # The filter's trajectory is recorded at every odometry sample.
    assert len(track.t) == len(odom) and np.all(np.diff(track.t) >= 0)
    # Without the gate the outlier is fused and pulls the estimate towards it.
    loose = F.fuse(_config(rejection_threshold=math.inf), odom, start, fixes,
                   position_sigma_m=2.0)
    assert loose.fix_accepted[k] and loose.rejected == 0
    i = int(np.searchsorted(loose.t, ft[k], side='right'))  # just after the fix
    assert abs(loose.xy[i, 1]) > abs(track.xy[i, 1]) + 20.0


def test_dead_reckoning_filter_follows_the_odometry_and_imu_yaw_helps():
    odom, t, truth, _, _ = _drift_scenario(duration=60.0)
    start = F.Pose2D(0.0, 0.0, 0.0, 0.0)
    dr = F.fuse(_config(), odom, start, None, position_sigma_m=2.0)
    tf = F.odom_to_map_transform((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    odo = F.align_odometry(odom, tf)
    assert np.max(np.linalg.norm(dr.xy - odo, axis=1)) < 5.0
    # An earth-referenced yaw of 0 (the truth) removes the curve.
    imu = F.ImuSeries(t, np.zeros_like(t), np.full_like(t, 1e-4), np.zeros_like(t),
                      np.full_like(t, 1e-4))
    cfg = _config(imu_topic='/imu/data', imu_fields=('yaw', 'vyaw'))
    with_imu = F.fuse(cfg, odom, start, None, imu, position_sigma_m=2.0)
    e_imu = F.trajectory_errors(with_imu.t, with_imu.xy, t, truth).final_error_m
    e_dr = F.trajectory_errors(dr.t, dr.xy, t, truth).final_error_m
    assert e_imu < e_dr / 5


def test_fixes_before_the_start_are_not_fused_and_no_odometry_is_an_error():
    odom, _, _, ft, fxy = _drift_scenario(duration=10.0)
    fixes = F.FixInput(np.array([-1.0, 2.0]), fxy[:2], np.tile(np.eye(2) * 100, (2, 1, 1)))
    track = F.fuse(_config(), odom, F.Pose2D(0.0, 0.0, 0.0, 0.0), fixes, position_sigma_m=2.0)
    assert not track.fix_accepted[0] and math.isnan(track.fix_d2[0])
    assert track.fix_accepted[1]
    empty = _series(np.zeros(0), np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(InputError, match='needs odometry'):
        F.fuse(_config(), empty, F.Pose2D(0.0, 0.0, 0.0, 0.0))


def test_wrap_angle():
    np.testing.assert_allclose(F.wrap_angle([math.pi + 0.1, -math.pi - 0.1, 0.3]),
                               [-math.pi + 0.1, math.pi - 0.1, 0.3])
