"""The demo's pieces on a small world: a drive bag played through geozoom_node over rclpy,
its fixes scored against the bag's ground truth, the fusion replayed and the report written.
"""

import functools
import json
from pathlib import Path
import sys

import numpy as np
import pytest

from geozoom_ros.geo import LocalFrame
from geozoom_ros.world import drive as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'core'))
from frames import pattern_frame  # noqa: E402, I100

ROADS = [np.array([[-120.0, -120.0], [120.0, -120.0], [120.0, 120.0], [-120.0, 120.0],
                   [-120.0, -120.0]])]


_render = functools.partial(pattern_frame, size=(64, 48))


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    from geozoom_ros.ros.bench import make_small_world
    folder = tmp_path_factory.mktemp('demo_world')
    world = make_small_world(folder / 'world')
    frame = LocalFrame(47.37, 8.54)  # make_small_world's centre
    world['drive'] = D.write_drive_bag_for_roads(ROADS, frame, _render, folder / 'drive',
                                                 length_m=150.0, rate_hz=2.0, seed=3,
                                                 progress=False, sensor_rate_hz=20.0)
    return world


def test_drive_through_the_node_is_scored_and_reported(small, tmp_path, capsys):
    from geozoom_ros.demo import run_drive
    from geozoom_ros.eval import bag as B

    report, ev = run_drive(small['drive'], small['map'], small['bundle'], small['model'],
                           tmp_path / 'drive', rate=4.0, max_rate_hz=50.0, beam_width=4,
                           min_confidence=0.0)
    bag = B.read_bag(small['drive'], quiet=True)
    n_frames = bag.n_images
    metrics = json.loads((report.parent / 'metrics.json').read_text())
    # Every frame reached the node; the node localised each one it took (newest wins).
    assert metrics['frames']['evaluated'] >= n_frames // 2
    assert metrics['frames']['evaluated'] <= n_frames
    # The fixes carry the camera frames' stamps, so each one is matched with ground truth.
    stamps = {f.stamp_ns for f in ev.frames}
    assert stamps <= {fr.stamp_ns for fr in bag.images()}
    assert np.all(np.isfinite(ev.error_m[np.isfinite(ev.true_lat)]))
    # The gate let every fix through (min_confidence 0, covariances well under max_sigma_m).
    assert metrics['frames']['published'] == metrics['frames']['evaluated']
    # The fusion replay ran on the bag's odometry and IMU and measured both trajectories.
    fu = metrics['fusion']
    assert fu['odometry_only']['ate_rmse_m'] > 0.0
    assert np.isfinite(fu['fused']['final_error_m'])
    for name in ('report.md', 'metrics.json', 'error_cdf.png', 'trajectory_map.png'):
        assert (report.parent / name).stat().st_size > 0
    out = capsys.readouterr().out
    assert 'frames evaluated' in out and 'odometry alone' in out


def test_the_node_runs_the_fused_search_with_the_imu_heading(small, tmp_path):
    from geozoom_ros.bundle import build_bundle
    from geozoom_ros.demo import demo_node_params
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.retrieval import RetrievalModel
    from geozoom_ros.ros.live import run_node_on_bag

    cfg = PolicyConfig(embed_dim=16, view_size=32, ground_size=(32, 32), decoder_heads=2,
                       context_m=60.0, heading_aligned=True)
    retr = save_model(RetrievalModel(cfg, pretrained=False).eval(), tmp_path / 'retr')
    bundle = build_bundle(small['map'], small['model'], tmp_path / 'bundle', progress=False,
                          retrieval_model=retr)
    params = demo_node_params(bundle, small['model'], method='zoom-fused',
                              retrieval_model=str(retr), max_rate_hz=50.0, beam_width=4,
                              min_confidence=0.0)
    fixes, diag = run_node_on_bag(small['drive'], params, tmp_path / 'node', rate=4.0)
    assert len(fixes) >= 1 and int(diag['frames_processed']) >= len(fixes)
    # The fused search took the IMU's heading for its heading-aligned crops.
    assert diag['heading_mode'] == 'imu'
