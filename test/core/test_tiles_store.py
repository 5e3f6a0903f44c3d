"""Tile stores: MBTiles (TMS flip, read-only, threads, preload) and XYZ directories."""

import concurrent.futures as cf
import json
import os
import random
import sqlite3

import cv2
import numpy as np
import pytest
from rasters import make_raster

from geozoom_ros.errors import TileStoreError
from geozoom_ros.tiles.build import build_mbtiles
from geozoom_ros.tiles.store import open_store, sniff_format, verify_pyramid
from geozoom_ros.tiles.views import render_view


def _png(rgb):
    ok, buf = cv2.imencode('.png', cv2.cvtColor(np.asarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _solid(colour, size=256):
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = colour
    return img


def _hand_mbtiles(path, tiles, fmt='png', extra_meta=None):
    """Write an MBTiles file by hand; ``tiles`` maps XYZ (z, x, y) to RGB arrays."""
    conn = sqlite3.connect(path)
    conn.executescript('CREATE TABLE metadata (name TEXT, value TEXT);'
                       'CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, '
                       'tile_row INTEGER, tile_data BLOB);')
    meta = {'name': 'hand', 'format': fmt}
    meta.update(extra_meta or {})
    conn.executemany('INSERT INTO metadata VALUES (?, ?)', meta.items())
    for (z, x, y), rgb in tiles.items():
        conn.execute('INSERT INTO tiles VALUES (?, ?, ?, ?)',
                     (z, x, (1 << z) - 1 - y, _png(rgb)))
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp('store')
    make_raster(d / 'ortho.tif', crs='utm', size=(400, 400), gsd_m=0.5)
    out = build_mbtiles([d / 'ortho.tif'], d / 'map.mbtiles', max_zoom=19, workers=1,
                        progress=False)
    with open_store(out) as store:
        tiles = {(z, x, y): bytes(b) for z, x, y, b in store.tiles()}
    return out, tiles


def test_tms_flip_against_hand_placed_tile(tmp_path):
    red, blue = (250, 10, 10), (10, 10, 250)
    path = _hand_mbtiles(tmp_path / 'hand.mbtiles', {(3, 2, 1): _solid(red),
                                                     (3, 5, 6): _solid(blue)})
    with open_store(path) as store:
        # tile_row in the file is 2**3 - 1 - y: XYZ (3, 2, 1) sits in row 6.
        assert store.get_tile(3, 2, 1)[0, 0].tolist() == list(red)
        assert store.get_tile(3, 5, 6)[128, 128].tolist() == list(blue)
        assert store.get_tile(3, 2, 6) is None
        assert store.get_tile_bytes(3, 5, 1) is None
        assert store.zooms() == [3]
        meta = store.metadata
        assert (meta.format, meta.tile_size, meta.minzoom, meta.maxzoom) == ('png', 256, 3, 3)
        # Without bounds metadata the bounds are those of the tiles at the top zoom.
        west, south, east, north = meta.bounds
        assert west == pytest.approx(-90.0) and east == pytest.approx(90.0)
        assert north > 66.0 > 0 > south


def test_metadata_of_a_built_map(built):
    path, tiles = built
    with open_store(path) as store:
        meta = store.metadata
        assert meta.format == 'jpg' and meta.tile_size == 256 and meta.name == 'map'
        assert meta.maxzoom == 19 and meta.minzoom <= 17
        assert store.zooms() == list(range(meta.minzoom, 20))
        west, south, east, north = meta.bounds
        assert west < 8.54 < east and south < 47.37 < north
        lon, lat, zoom = meta.center
        assert west < lon < east and south < lat < north and meta.minzoom <= zoom <= 19
        assert sum(store.count_tiles().values()) == len(tiles)
        assert store.tile_bytes() == sum(len(b) for b in tiles.values())
        assert verify_pyramid(store) == []


def test_decoded_tiles_are_cached_and_read_only(built):
    path, tiles = built
    z, x, y = next(iter(tiles))
    with open_store(path) as store:
        a = store.get_tile(z, x, y)
        assert a.shape == (256, 256, 3) and a.dtype == np.uint8
        assert store.get_tile(z, x, y) is a
        with pytest.raises(ValueError):
            a[0, 0] = 0
        expect = cv2.cvtColor(cv2.imdecode(np.frombuffer(tiles[(z, x, y)], np.uint8),
                                           cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(a, expect)


def test_opened_read_only(built):
    path, _ = built
    before = (os.path.getmtime(path), os.path.getsize(path))
    with open_store(path) as store:
        with pytest.raises(sqlite3.OperationalError, match='readonly'):
            store._conn().execute('DELETE FROM tiles')
    assert (os.path.getmtime(path), os.path.getsize(path)) == before


@pytest.mark.parametrize('preload', [False, True])
def test_several_threads_read_the_same_store(built, preload):
    path, tiles = built
    keys = list(tiles)
    missing = [(19, 0, 0), (5, 1, 1)]

    def work(seed):
        rng = random.Random(seed)
        for _ in range(150):
            key = rng.choice(keys + missing)
            data = store.get_tile_bytes(*key)
            assert data == tiles.get(key)
            img = store.get_tile(*key)
            assert (img is None) == (key not in tiles)
        return seed

    with open_store(path, preload=preload, cache_tiles=8) as store:
        with cf.ThreadPoolExecutor(max_workers=6) as pool:
            assert sorted(pool.map(work, range(12))) == list(range(12))
        if not preload:
            assert len(store._conns) > 1  # one connection per reading thread


def test_preload_within_and_over_budget(built):
    path, tiles = built
    total = sum(len(b) for b in tiles.values())
    with open_store(path, preload=True, memory_budget_mb=total / 1e6 * 1.01) as store:
        assert store.preloaded and store.preloaded_bytes == total
        assert store.get_tile_bytes(*next(iter(tiles))) == tiles[next(iter(tiles))]
    with pytest.raises(TileStoreError, match=r'map\.mbtiles.*memory budget'):
        open_store(path, preload=True, memory_budget_mb=total / 1e6 * 0.5)


def test_xyz_directory_store_matches_mbtiles(built, tmp_path):
    path, tiles = built
    root = tmp_path / 'xyz'
    for (z, x, y), data in tiles.items():
        (root / str(z) / str(x)).mkdir(parents=True, exist_ok=True)
        (root / str(z) / str(x) / f'{y}.jpg').write_bytes(data)
    with open_store(path) as mb, open_store(root, preload=True) as xyz:
        assert xyz.metadata.format == 'jpg' and xyz.zooms() == mb.zooms()
        assert xyz.count_tiles() == mb.count_tiles()
        for key, data in tiles.items():
            assert xyz.get_tile_bytes(*key) == data
        # Bounds come from the tiles of the top zoom: they contain the map's data bounds.
        xb, mbb = xyz.metadata.bounds, mb.metadata.bounds
        assert xb[0] <= mbb[0] and xb[1] <= mbb[1] and xb[2] >= mbb[2] and xb[3] >= mbb[3]
    (root / 'metadata.json').write_text(json.dumps({'name': 'xyz map', 'bounds': list(mbb),
                                                    'attribution': 'test imagery'}))
    with open_store(root) as xyz:
        assert xyz.metadata.name == 'xyz map' and xyz.metadata.attribution == 'test imagery'
        assert xyz.metadata.bounds == pytest.approx(mbb)
        with open_store(path) as mb:
            for z, x, y in list(tiles)[::3]:
                np.testing.assert_array_equal(render_view(xyz, (x, y, z), 256).image,
                                              render_view(mb, (x, y, z), 256).image)


def test_bad_files_raise_one_line_naming_the_file(built, tmp_path):
    path, _ = built
    cases = {}
    junk = tmp_path / 'junk.mbtiles'
    junk.write_bytes(os.urandom(4096))
    cases[junk] = 'not an MBTiles'
    truncated = tmp_path / 'truncated.mbtiles'
    truncated.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    cases[truncated] = 'truncated'
    other = tmp_path / 'other.mbtiles'
    conn = sqlite3.connect(other)
    conn.execute('CREATE TABLE t (a)')
    conn.commit()
    conn.close()
    cases[other] = 'not an MBTiles file'
    vector = _hand_mbtiles(tmp_path / 'vector.mbtiles', {(2, 1, 1): _solid((9, 9, 9))},
                           fmt='pbf')
    cases[vector] = "unsupported tile format 'pbf'"
    cases[tmp_path / 'absent.mbtiles'] = 'no such file'
    empty_dir = tmp_path / 'empty'
    empty_dir.mkdir()
    cases[empty_dir] = 'no {z}/{x}/{y}'
    for bad, words in cases.items():
        with pytest.raises(TileStoreError) as info:
            open_store(bad)
        msg = str(info.value)
        assert str(bad) in msg and words in msg and '\n' not in msg


def test_corrupt_tile_is_reported(tmp_path):
    path = _hand_mbtiles(tmp_path / 'c.mbtiles', {(4, 3, 3): _solid((1, 2, 3)),
                                                  (4, 3, 4): _solid((1, 2, 3))})
    conn = sqlite3.connect(path)
    conn.execute('UPDATE tiles SET tile_data=? WHERE tile_row=?', (b'\x89PNG\r\n\x1a\nxx', 11))
    conn.commit()
    conn.close()
    with open_store(path) as store:
        with pytest.raises(TileStoreError, match='4/3/4 does not decode'):
            store.get_tile(4, 3, 4)
        problems = verify_pyramid(store)
    assert any('4/3/4 does not decode' in p for p in problems)


def test_sniff_format():
    assert sniff_format(_png(_solid((0, 0, 0), 8))) == 'png'
    ok, jpg = cv2.imencode('.jpg', _solid((0, 0, 0), 8))
    assert sniff_format(jpg.tobytes()) == 'jpg'
    ok, webp = cv2.imencode('.webp', _solid((0, 0, 0), 8))
    assert sniff_format(webp.tobytes()) == 'webp'
    assert sniff_format(b'GIF89a') is None
