"""Training data: tables, bad rows, zoom paths, held-out softmax masks (real XYZ tile stores)."""

import json
import math

import cv2
import mercantile
import numpy as np
import pytest

from geozoom_ros import geo
from geozoom_ros.errors import InputError
from geozoom_ros.model.config import PolicyConfig, TrainConfig
from geozoom_ros.train.data import load_world, read_table, softmax_mask

LAT0, LON0 = 47.37, 8.54
ROOT_ZOOM = 17


def _pattern(zoom, x, y, size=256, block_m=12.0, seed=0):
    """Colour of each pixel of tile (zoom, x, y): random blocks of ``block_m`` metres."""
    scale = 2 ** (zoom - 21)  # pixels at this zoom per pixel at zoom 21 (about 0.05 m)
    px = (x * size + np.arange(size) + 0.5) / scale
    py = (y * size + np.arange(size) + 0.5) / scale
    res21 = geo.ground_resolution_m(21, LAT0)
    bx = np.floor(px * res21 / block_m).astype(np.int64)
    by = np.floor(py * res21 / block_m).astype(np.int64)
    h = (bx[None, :] * 73856093) ^ (by[:, None] * 19349663) ^ seed
    rgb = np.stack([(h >> s) & 0xFF for s in (0, 8, 16)], axis=-1)
    return (30 + rgb * 200 // 255).astype(np.uint8)


def make_world(tmp_path, n_rows=24, seed=0, zooms=range(14, 19), root=None, splits=None,
               bad_rows=False):
    """Write a one-root XYZ tile pyramid and an index.csv of ground images; return paths."""
    root = root or geo.cell_at(LAT0, LON0, ROOT_ZOOM)
    tiles_dir = tmp_path / f'tiles{seed}'
    w, s, e, n = geo.cell_bounds(root)
    for z in zooms:
        for t in mercantile.tiles(w + 1e-9, s + 1e-9, e - 1e-9, n - 1e-9, [z]):
            d = tiles_dir / str(z) / str(t.x)
            d.mkdir(parents=True, exist_ok=True)
            img = _pattern(z, t.x, t.y, seed=seed)
            cv2.imwrite(str(d / f'{t.y}.png'), img[..., ::-1])
    (tiles_dir / 'metadata.json').write_text(json.dumps({'bounds': [w, s, e, n]}))
    from geozoom_ros.tiles.store import open_store
    from geozoom_ros.tiles.views import render_crop

    store = open_store(tiles_dir)
    rng = np.random.default_rng(seed)
    img_dir = tmp_path / f'images{seed}'
    img_dir.mkdir()
    lines = ['path,lat,lon,heading_deg,split']
    margin = 0.1
    for i in range(n_rows):
        lat = s + (n - s) * rng.uniform(margin, 1 - margin)
        lon = w + (e - w) * rng.uniform(margin, 1 - margin)
        heading = float(rng.uniform(0, 360))
        # A stand-in ground image that shares content with the map: the heading-up crop.
        crop = render_crop(store, lat, lon, 30.0, 48, heading).image
        ground = cv2.resize(crop, (64, 48))
        name = f'{i:04d}.jpg'
        cv2.imwrite(str(img_dir / name), ground[..., ::-1])
        split = splits[i] if splits else 'train'
        lines.append(f'{img_dir.name}/{name},{lat:.8f},{lon:.8f},{heading:.2f},{split}')
    if bad_rows:
        lines.append(f'{img_dir.name}/missing.jpg,{LAT0},{LON0},0,train')
        (img_dir / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
        lines.append(f'{img_dir.name}/broken.jpg,{(s + n) / 2},{(w + e) / 2},0,train')
        lines.append(f'{img_dir.name}/0000.jpg,{n + 0.01},{(w + e) / 2},0,train')
        lines.append(f'{img_dir.name}/0000.jpg,not-a-number,{(w + e) / 2},0,train')
    csv_path = tmp_path / f'index{seed}.csv'
    csv_path.write_text('\n'.join(lines) + '\n')
    store.close()
    return tiles_dir, csv_path, root


def tiny_config(**kw):
    base = dict(embed_dim=32, grid_k=4, steps=2, root_zoom=ROOT_ZOOM, view_size=32,
                ground_size=(48, 32), decoder_layers=1, decoder_heads=2, dropout=0.0,
                context_m=30.0)
    base.update(kw)
    return PolicyConfig(**base)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    tiles, csv_path, root = make_world(tmp_path, n_rows=6, bad_rows=True)
    world, report = load_world(tiles, csv_path, tiny_config(), TrainConfig(), progress=False)
    assert report.rows == 10
    assert report.kept == 6 == len(world.samples)
    assert report.skipped == {'missing image': 1, 'unreadable image': 1,
                              'outside the map': 1, 'unparsable row': 1}
    assert report.n_skipped == 4
    text = report.summary()
    assert 'skipped 4' in text and 'missing.jpg' in text


def test_paths_and_cells_follow_geo(tmp_path):
    tiles, csv_path, root = make_world(tmp_path, n_rows=5)
    cfg = tiny_config()
    world, _ = load_world(tiles, csv_path, cfg, TrainConfig(), progress=False)
    assert world.roots(cfg.root_zoom) == [root]
    for s in world.samples:
        assert s.cells[0] == root
        assert list(s.actions) == geo.path_to(root, s.lat, s.lon, cfg.steps, cfg.grid_k)
        assert s.cells[-1] == geo.cell_at(s.lat, s.lon, cfg.terminal_zoom)
        assert 0 <= s.heading < 360
    view = world.view(root, 32)
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8 and view.std() > 10
    assert world.view(root, 32) is view  # cached


def test_heldout_cells_leave_the_softmax(tmp_path):
    splits = ['train'] * 8 + ['test-same'] * 4
    tiles, csv_path, root = make_world(tmp_path, n_rows=12, splits=splits)
    cfg = tiny_config()
    world, _ = load_world(tiles, csv_path, cfg, TrainConfig(), progress=False)
    train_cells = {c for s in world.samples if s.split == 'train' for c in s.cells[1:]}
    held_cells = {c for s in world.samples if s.split != 'train' for c in s.cells[1:]}
    assert world.heldout_only == held_cells - train_cells
    assert world.heldout_only  # the draw leaves some held-out-only cells
    for s in world.samples:
        if s.split != 'train':
            continue
        mask = softmax_mask(s, world, cfg.grid_k)
        assert mask.shape == (cfg.steps, 16)
        for t in range(cfg.steps):
            assert mask[t, s.actions[t]]  # the truth always competes
            for a, c in enumerate(geo.children(s.cells[t], cfg.grid_k)):
                assert mask[t, a] == (c not in world.heldout_only)


def test_table_errors_are_one_line(tmp_path):
    bad = tmp_path / 'bad.csv'
    bad.write_text('file,latitude,longitude\nx.jpg,1,2\n')
    with pytest.raises(InputError, match='header lacks column'):
        read_table(bad)
    with pytest.raises(InputError, match='no such data file'):
        read_table(tmp_path / 'nope.csv')


def test_exif_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / 'geotagged'
    folder.mkdir()
    img = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    exif = Image.Exif()
    gps = {1: 'N', 2: (47.0, 22.0, 12.0), 3: 'W', 4: (8.0, 32.0, 24.0), 17: 90.0}
    exif[0x8825] = gps
    img.save(folder / 'a.jpg', exif=exif)
    img.save(folder / 'b.jpg')  # no GPS
    rows, report = read_table(folder)
    assert len(rows) == 1 and report.skipped == {'no EXIF GPS': 1}
    assert math.isclose(rows[0]['lat'], 47 + 22 / 60 + 12 / 3600, abs_tol=1e-9)
    assert math.isclose(rows[0]['lon'], -(8 + 32 / 60 + 24 / 3600), abs_tol=1e-9)
    assert rows[0]['heading'] == 90.0
