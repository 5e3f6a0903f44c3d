"""The eval-bag report: files, non-empty plots, map background, JSON and Markdown."""

import json
from pathlib import Path
import sys

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_bag import _render, FRAME, ROADS  # noqa: E402,I100

from geozoom_ros.eval import bag as B  # noqa: E402,I100
from geozoom_ros.eval import report as R  # noqa: E402
from geozoom_ros.world import drive as D  # noqa: E402


@pytest.fixture(scope='module')
def evaluation(tmp_path_factory):
    folder = tmp_path_factory.mktemp('report')
    path = D.write_drive_bag_for_roads(ROADS, FRAME, _render, folder / 'drive', length_m=300.0,
                                       rate_hz=2.0, seed=5, progress=False,
                                       sensor_rate_hz=20.0, write_raw=False)
    bag = B.read_bag(path, quiet=True)
    rng = np.random.default_rng(1)
    frames = []
    for i in range(len(bag.gt)):
        e, n = bag.gt.enu[i] + rng.normal(0.0, 12.0, 2)
        conf = 0.9
        if i % 9 == 4:
            e += 400.0  # a confident wrong cell: the EKF gate rejects it
        if i % 7 == 3:
            conf = 0.05  # low confidence: gated out by the node
        lat, lon, _ = bag.frame.to_latlon(e, n, 0.0)
        gated, sigma, cov = B.Gate().passes(conf, np.eye(2) * 144.0)
        frames.append(B.FrameFix(i, bag.t0_ns + int(round(bag.gt.t[i] * 1e9)),
                                 float(bag.gt.t[i]), 'fix', float(lat), float(lon), cov, sigma,
                                 conf, gated, float(rng.uniform(5.0, 15.0))))
    ev = B.evaluate(bag, frames, quiet=True)
    # A real GeoTIFF orthophoto under the drive.
    from geozoom_ros.tiles.bench import synthetic_ortho
    ortho = folder / 'ortho.tif'
    synthetic_ortho(ortho, size_m=400.0, gsd_m=2.0, lat=FRAME.lat0, lon=FRAME.lon0)
    return ev, ortho


def _png_pixels(path):
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    return img[..., :3]


def test_report_files_exist_and_plots_are_not_empty(evaluation, tmp_path):
    ev, ortho = evaluation
    out = tmp_path / 'r'
    md = R.write_report(ev, out, map_path=ortho)
    assert md == out / 'report.md'
    for name in R.FIGURES:
        px = _png_pixels(out / name)
        assert px.shape[0] > 300 and px.shape[1] > 500
        # A blank canvas has (almost) no variance; a drawn plot has plenty.
        assert float(px.std()) > 0.05, name
        assert f']({name})' in md.read_text()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['figures'] == list(R.FIGURES) and m['map_background'] == str(ortho)
    assert m['fusion']['fixes_rejected_by_gate'] >= 3
    assert m['frames']['published'] < m['frames']['evaluated']
    text = md.read_text()
    assert '| fused: ATE RMSE / final / max |' in text
    assert 'fixes rejected by the EKF gate' in text
    assert not [p for p in out.iterdir() if p.name.startswith('.')]


def test_map_background_from_geotiff_and_none(evaluation, tmp_path):
    ev, ortho = evaluation
    img = R.map_background(ortho, FRAME.lat0, FRAME.lon0, 300.0, 256)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and img.std() > 10
    assert R.map_background(tmp_path / 'missing.mbtiles', FRAME.lat0, FRAME.lon0, 300.0) is None
    assert R.map_background(None, FRAME.lat0, FRAME.lon0, 300.0) is None
    # The map figure with a background differs from the one without.
    a, b = tmp_path / 'a.png', tmp_path / 'b.png'
    R.plot_trajectory_map(ev, a, map_path=ortho)
    R.plot_trajectory_map(ev, b, map_path=None)
    pa, pb = _png_pixels(a), _png_pixels(b)
    assert pa.shape == pb.shape and np.abs(pa - pb).mean() > 0.01


def test_report_without_ground_truth(evaluation, tmp_path):
    ev, _ = evaluation
    bag = B.read_bag(ev.bag.path, gt_topic='', quiet=True)
    frames = [f for f in ev.frames if f.gated_in][:20]
    ev2 = B.evaluate(bag, frames, quiet=True)
    md = R.write_report(ev2, tmp_path / 'r')
    for name in R.FIGURES:
        assert float(_png_pixels(tmp_path / 'r' / name).std()) > 0.02
    m = json.loads((tmp_path / 'r' / 'metrics.json').read_text())
    assert m['fixes'] is None and m['fusion']['start_pose_from'].startswith('the drive record')
    assert 'n/a' not in md.read_text().split('## Summary')[1].split('|---|---|')[0]


def test_summary_rows_of_a_metrics_dict():
    rows = dict(R.summary_rows({
        'frames': {'evaluated': 10, 'published': 8},
        'fixes': {'recall@25m': 0.5, 'recall@50m': 0.75, 'recall@100m': 1.0,
                  'median_error_m': 24.0, 'nees_mean': 2.1},
        'fusion': {'fixes_rejected_by_gate': 1, 'fixes_offered': 8,
                   'fused': {'ate_rmse_m': 5.0, 'final_error_m': 4.0, 'max_error_m': 9.0},
                   'final_error_ratio_odometry_over_fused': 12.5},
        'latency_ms': {'p50': 10.0, 'p95': 20.0}}))
    assert rows['fixes within 25 m'] == '50.0 %'
    assert rows['fused: ATE RMSE / final / max'] == '5.0 / 4.0 / 9.0 m'
    assert rows['final error, odometry alone / fused'] == '12.5 x'
    assert rows['fixes rejected by the EKF gate'] == '1 of 8'
