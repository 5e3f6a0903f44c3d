"""`geozoom world make|preview` end to end on a tiny world, and the CLI's bad arguments."""

import json
import math
import sqlite3

import numpy as np
import pytest

from geozoom_ros.cli import main
from geozoom_ros.geo import destination, latlon_to_utm
from geozoom_ros.world import dataset as D
from geozoom_ros.world.city import make_city

ORIGIN = (52.52, 13.405)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from geozoom_ros.world.make import make_world
    out = tmp_path_factory.mktemp('world') / 'tiny'
    make_world(out, 21, 300, ORIGIN, 'autumn', n_ground=40, ground_size=(128, 96), workers=2,
               progress=False, drive=False)
    return out


def test_world_folder_holds_every_artefact(world):
    import rasterio
    info = json.loads((world / 'world.json').read_text())
    assert info['seed'] == 21 and info['size_m'] == 300 and info['style'] == 'autumn'
    assert info['origin'] == list(ORIGIN)
    assert info['counts']['buildings'] > 50
    assert sum(info['counts'][f'views_{s}'] for s in D.SPLITS) == 40
    assert {'geozoom_ros', 'numpy', 'moderngl'} <= set(info['versions'])
    with rasterio.open(world / 'ortho.tif') as src:
        assert src.crs.to_epsg() == 32633  # UTM 33N holds Berlin
        assert src.count == 3 and src.dtypes[0] == 'uint8'
        assert src.res[0] == pytest.approx(0.4)
        assert 300 / 0.4 <= src.width < 300 / 0.4 + 20
        img = src.read()
        assert img.std() > 20
    with sqlite3.connect(world / 'map.mbtiles') as db:
        n = db.execute('SELECT COUNT(*) FROM tiles').fetchone()[0]
        meta = dict(db.execute('SELECT name, value FROM metadata'))
    assert n > 4 and meta['format'] in ('jpg', 'jpeg')
    rows = D.read_index(world / 'ground' / 'index.csv')
    assert len(rows) == 40
    assert set(D.INDEX_COLUMNS) <= set(rows[0])
    assert {r['split'] for r in rows} <= set(D.SPLITS)
    assert {'train', 'val', 'test-same'} <= {r['split'] for r in rows}
    for r in rows:
        assert (world / 'ground' / r['path']).is_file()
        assert 60 <= r['fov_deg'] <= 100 and 1.4 <= r['height_m'] <= 2.5
    assert not list(world.glob('.*tmp*'))


def test_no_training_view_in_a_test_cross_block_or_its_margin(world):
    info = json.loads((world / 'world.json').read_text())
    city = make_city(21, 300, ORIGIN, 'autumn', info['knobs'])
    blocks = np.array(info['splits']['cross_blocks_enu']).reshape(-1, 4)
    assert np.allclose(blocks, D.cross_blocks(city), atol=1e-3)
    rows = D.read_index(world / 'ground' / 'index.csv')
    # Positions from lat/lon, as a user of index.csv sees them.
    lat = np.array([r['lat'] for r in rows])
    lon = np.array([r['lon'] for r in rows])
    e, n, _ = city.frame.to_enu(lat, lon, np.zeros(len(rows)))
    d = D.distance_to_boxes(np.stack([e, n], 1), blocks)
    split = np.array([r['split'] for r in rows])
    assert np.all(d[split != 'test-cross'] > info['splits']['margin_m'])
    assert np.all(d[split == 'test-cross'] == 0)


def test_ground_jpegs_are_the_renderer_s_views_and_agree_with_the_orthophoto(world):
    import cv2
    import rasterio

    from geozoom_ros.world.render_gl import GroundRenderer
    info = json.loads((world / 'world.json').read_text())
    city = make_city(21, 300, ORIGIN, 'autumn', info['knobs'])
    rows = D.read_index(world / 'ground' / 'index.csv')
    views = {v['path']: v for v in D.sample_views(city, 40)}
    r = GroundRenderer(city, 128, 96)
    try:
        # Determinism across processes: a fresh render equals the worker's JPEG.
        for row in rows[:3]:
            v = views[row['path']]
            img = D.render_view(r, v, (128, 96))
            ok, buf = cv2.imencode('.jpg', img[..., ::-1],
                                   [cv2.IMWRITE_JPEG_QUALITY, v['jpeg_quality']])
            again = cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(int)
            jpg = cv2.imread(str(world / 'ground' / row['path'])).astype(int)
            assert np.abs(again - jpg).mean() < 1.0
        # Bearing/distance consistency through the files users get: index.csv + ortho.tif.
        agree = total = 0
        with rasterio.open(world / 'ortho.tif') as src:
            epsg = src.crs.to_epsg()
            inv = ~src.transform
            ortho = np.moveaxis(src.read(), 0, -1)
            grid_labels = _ortho_labels(r, city, src)
        for row in rows:
            hits = _hits(r, city, row)
            for bearing, dist, bid in hits:
                lat, lon = destination(row['lat'], row['lon'], bearing, dist + 0.8)
                e, n, _ = latlon_to_utm(lat, lon, epsg)
                c, rr = inv @ (e, n)
                if not (0 <= int(rr) < ortho.shape[0] and 0 <= int(c) < ortho.shape[1]):
                    continue
                total += 1
                agree += int(grid_labels[int(rr), int(c)] == bid)
        assert total > 100
        assert agree / total > 0.85
    finally:
        r.close()


def _ortho_labels(renderer, city, src):
    """Building ids on the pixel grid of ortho.tif, rendered through the same tile maths."""
    from geozoom_ros.world import ortho
    grid = ortho.ortho_grid(city)
    assert (grid.width, grid.height) == (src.width, src.height)
    out = np.zeros((grid.height, grid.width), np.int64)
    for col0, row0, w, h in grid.tiles(512):
        a = ortho.tile_px_to_enu(city, grid, col0, row0, w, h)
        out[row0:row0 + h, col0:col0 + w] = renderer.render_ortho(a, w, h, labels=True)
    return out


def _hits(renderer, city, row, size=(96, 72)):
    from geozoom_ros.world.render_gl import camera_axes
    x, y = row['east_m'], row['north_m']
    h, heading, fov = row['height_m'], row['heading_deg'], row['fov_deg']
    ids, depth = renderer.render_labels(x, y, h, heading, fov, row['pitch_deg'],
                                        row['roll_deg'], size=size)
    right, up, fwd = camera_axes(heading, row['pitch_deg'], row['roll_deg'])
    tx = math.tan(math.radians(fov) / 2)
    ty = tx * size[1] / size[0]
    out = []
    rows_, cols = np.nonzero((ids > 0) & (ids <= len(city.buildings)) & (depth < 120))
    for r_, c in zip(rows_[::11], cols[::11]):
        ray = fwd + ((c + 0.5) / size[0] * 2 - 1) * tx * right \
            + (1 - (r_ + 0.5) / size[1] * 2) * ty * up
        p = ray * depth[r_, c]
        out.append((math.degrees(math.atan2(p[0], p[1])) % 360, math.hypot(p[0], p[1]),
                    ids[r_, c]))
    return out


def test_preview_sheet(world, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / 'sheet.png'
    assert main(['world', 'preview', str(world), '-o', str(out), '--n', '4']) == 0
    img = Image.open(out)
    assert img.width > 600 and img.height > 600
    assert np.asarray(img).std() > 20


def _run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize('change, match', [
    ({'--size-m': '0'}, 'size'),
    ({'--origin': '95,13'}, 'origin'),
    ({'--origin': 'berlin'}, 'origin'),
    ({'--style': 'spring'}, 'style'),
    ({'--preset': 'satellite'}, 'preset'),
])
def test_bad_arguments_give_one_line_and_exit_2(change, match, tmp_path, capsys):
    args = {'--seed': '1', '--size-m': '300', '--origin': '52.5,13.4', '--style': 'summer',
            '-o': str(tmp_path / 'w')}
    args.update(change)
    argv = ['world', 'make', '--quiet', '--n-ground', '4', '--no-drive']
    for k, v in args.items():
        argv += [k, v]
    code, err = _run_cli(argv, capsys)
    assert code == 2
    assert err.startswith('geozoom world: error:') and match in err and '\n' not in err
    assert not (tmp_path / 'w' / 'world.json').exists()


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    code, err = _run_cli(['world', 'make', '--seed', '1', '--size-m', '300', '--origin',
                          '52.5,13.4', '-o', str(blocker / 'sub'), '--quiet'], capsys)
    assert code == 2 and 'not writable' in err and '\n' not in err
    code, err = _run_cli(['world', 'preview', str(tmp_path), '-o', str(tmp_path / 'x.png')],
                         capsys)
    assert code == 2 and 'world.json' in err
