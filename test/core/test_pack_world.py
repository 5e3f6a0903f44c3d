"""tools/pack_world.py: a compact copy of a world that trains like the original."""

import csv
from pathlib import Path
import sqlite3
import subprocess
import sys

import cv2
import numpy as np

from geozoom_ros.tiles.store import open_store

TOOL = Path(__file__).resolve().parents[2] / 'tools' / 'pack_world.py'


def _world(root):
    """A world folder: a 4-tile JPEG MBTiles and six views across three splits."""
    rng = np.random.default_rng(0)
    conn = sqlite3.connect(root / 'map.mbtiles')
    conn.executescript('CREATE TABLE metadata (name TEXT, value TEXT);'
                       'CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, '
                       'tile_row INTEGER, tile_data BLOB);')
    conn.executemany('INSERT INTO metadata VALUES (?, ?)',
                     [('name', 't'), ('format', 'jpg'), ('minzoom', '1'), ('maxzoom', '1'),
                      ('bounds', '-180,-85,180,85')])
    for x in range(2):
        for y in range(2):
            tile = cv2.GaussianBlur(rng.integers(0, 255, (256, 256, 3), np.uint8), (5, 5), 0)
            data = cv2.imencode('.jpg', tile, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
            conn.execute('INSERT INTO tiles VALUES (1, ?, ?, ?)', (x, y, data))
    conn.commit()
    conn.close()
    ground = root / 'ground'
    rows = []
    for i, split in enumerate(['train', 'train', 'val', 'test-same', 'test-cross', 'train']):
        name = f'{split}/{i:04d}.jpg'
        (ground / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(ground / name), rng.integers(0, 255, (192, 256, 3), np.uint8))
        rows.append({'path': name, 'lat': 1.0 + i, 'lon': 2.0, 'heading_deg': 10.0,
                     'split': split, 'width': 256, 'height': 192})
    with open(ground / 'index.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True)


def test_pack_keeps_training_pixels_and_only_the_positions_of_held_out_views(tmp_path):
    world, out = tmp_path / 'world', tmp_path / 'packed'
    world.mkdir()
    rows = _world(world)
    res = _run(world, out, '--ground-size', '60x45', '--map-quality', '40')
    assert res.returncode == 0, res.stderr
    assert '4 views at 60x45, 2 held-out thumbnails, 4 map tiles re-encoded' in res.stdout
    with open(out / 'ground' / 'index.csv', newline='') as f:
        packed = list(csv.DictReader(f))
    assert [(r['path'], r['split'], r['lat']) for r in packed] == \
        [(r['path'], r['split'], str(r['lat'])) for r in rows]
    for r in packed:
        img = cv2.imread(str(out / 'ground' / r['path']))
        want = (45, 60) if r['split'] in ('train', 'val') else (24, 32)
        assert img.shape[:2] == want and (int(r['height']), int(r['width'])) == want
    # The map: the same tiles, re-encoded smaller, still a readable pyramid.
    assert (out / 'map.mbtiles').stat().st_size < (world / 'map.mbtiles').stat().st_size
    with open_store(world / 'map.mbtiles') as a, open_store(out / 'map.mbtiles') as b:
        for z, x, y in [(1, 0, 0), (1, 1, 1)]:
            ta, tb = a.get_tile(z, x, y), b.get_tile(z, x, y)
            assert ta.shape == tb.shape
            assert 0 < np.abs(ta.astype(int) - tb.astype(int)).mean() < 12
    assert not list(out.rglob('*.tmp'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['packed', 'world']  # no temp folder
    # An existing copy is never overwritten.
    res = _run(world, out)
    assert res.returncode == 2 and 'already exists' in res.stderr


def test_a_corrupt_tile_is_one_line_and_leaves_no_partial_copy(tmp_path):
    world = tmp_path / 'world'
    world.mkdir()
    _world(world)
    conn = sqlite3.connect(world / 'map.mbtiles')
    conn.execute("UPDATE tiles SET tile_data = X'FFD8FF00' WHERE tile_column = 1 AND "
                 "tile_row = 0")
    conn.commit()
    conn.close()
    res = _run(world, tmp_path / 'packed')
    assert res.returncode == 2
    assert res.stderr.strip().count('\n') == 0 and 'tile 1/1/0 does not decode' in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['world']


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    res = _run(tmp_path / 'nowhere', tmp_path / 'out')
    assert res.returncode == 2
    assert res.stderr.strip().count('\n') == 0 and 'nowhere/map.mbtiles does not exist' in \
        res.stderr
    assert not (tmp_path / 'out').exists()
    res = _run(tmp_path, tmp_path / 'out', '--ground-size', '147')
    assert res.returncode == 2 and "'147': give WIDTHxHEIGHT" in res.stderr
    res = _run(tmp_path, tmp_path / 'out', '--quality', '500')
    assert res.returncode == 2 and "'500': give a JPEG quality from 1 to 100" in res.stderr
