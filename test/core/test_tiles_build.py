"""The GeoTIFF -> MBTiles builder: schema, zooms, mosaics, dtypes, parallel runs and resume."""

import json
import os
import sqlite3
import subprocess
import sys

import mercantile
import numpy as np
import pytest
import rasterio
from rasters import from_origin, LAT0, LON0, make_raster, pixel_latlon, write_geotiff
from rasters import write_no_crs

from geozoom_ros import geo
from geozoom_ros.errors import InputError
from geozoom_ros.tiles.build import build_mbtiles, default_min_zoom
from geozoom_ros.tiles.store import open_store, verify_pyramid
from geozoom_ros.tiles.views import render_crop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiles(path):
    conn = sqlite3.connect(path)
    try:
        return {(z, x, r): bytes(d) for z, x, r, d in conn.execute('SELECT * FROM tiles')}
    finally:
        conn.close()


def _meta(path):
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute('SELECT name, value FROM metadata'))
    finally:
        conn.close()


@pytest.fixture(scope='module')
def ortho(tmp_path_factory):
    d = tmp_path_factory.mktemp('ortho')
    tif = d / 'ortho.tif'
    make_raster(tif, crs='utm', size=(400, 400), gsd_m=0.5)
    return tif


def test_schema_metadata_and_default_zooms(ortho, tmp_path):
    out = build_mbtiles([ortho], tmp_path / 'm.mbtiles', workers=1, progress=False)
    assert out == tmp_path / 'm.mbtiles' and not (tmp_path / 'm.mbtiles.partial').exists()
    conn = sqlite3.connect(out)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    cols = [r[1] for r in conn.execute('PRAGMA table_info(tiles)')]
    conn.close()
    assert 'tile_index' in names
    assert cols == ['zoom_level', 'tile_column', 'tile_row', 'tile_data']
    meta = _meta(out)
    assert meta['format'] == 'jpg' and meta['type'] == 'baselayer' and meta['name'] == 'm'
    assert not any(k.startswith('geozoom_build') for k in meta)
    with rasterio.open(ortho) as src:
        gsd = abs(src.transform.a)
    native = geo.zoom_for_resolution(gsd, LAT0)
    assert int(meta['maxzoom']) == native
    west, south, east, north = map(float, meta['bounds'].split(','))
    corners = [pixel_latlon(ortho, r, c) for r in (0, 399) for c in (0, 399)]
    for lat, lon in corners:
        assert west <= lon <= east and south <= lat <= north
    minzoom = int(meta['minzoom'])
    assert minzoom == default_min_zoom((west, south, east, north), native)
    counts = json.loads(meta['geozoom_tile_counts'])
    assert counts[str(minzoom)] <= 4 < counts[str(native)]
    # TMS rows: the tile holding the raster centre at max zoom is stored at 2**z - 1 - y.
    t = mercantile.tile(LON0, LAT0, native)
    assert (native, t.x, (1 << native) - 1 - t.y) in _tiles(out)
    with open_store(out) as store:
        assert verify_pyramid(store) == []


def test_two_workers_build_the_same_pyramid(ortho, tmp_path):
    one = build_mbtiles([ortho], tmp_path / 'one.mbtiles', max_zoom=20, workers=1,
                        progress=False)
    two = build_mbtiles([ortho], tmp_path / 'two.mbtiles', max_zoom=20, workers=2,
                        progress=False)
    assert _tiles(one) == _tiles(two)


def test_mosaic_of_adjacent_inputs_later_wins(tmp_path):
    west = tmp_path / 'west.tif'
    east = tmp_path / 'east.tif'
    dw = make_raster(west, size=(200, 200), gsd_m=0.5, lon=LON0 - 0.0012, seed=1)
    de = make_raster(east, size=(200, 200), gsd_m=0.5, lon=LON0, seed=2)
    out = build_mbtiles([west, east], tmp_path / 'mosaic.mbtiles', fmt='png', workers=1,
                        progress=False)
    with open_store(out) as store:
        for tif, data in ((west, dw), (east, de)):
            lat, lon = pixel_latlon(tif, 25, 125 if tif == east else 25)
            crop = render_crop(store, lat, lon, 5.0, 9)
            r, c = (25, 125) if tif == east else (25, 25)
            assert np.abs(crop.image[4, 4].astype(int) - data[:, r, c]).max() <= 2
        # Where the two overlap (the west raster's eastern columns), the east raster shows.
        lat, lon = pixel_latlon(east, 75, 10)
        crop = render_crop(store, lat, lon, 2.0, 5)
        assert np.abs(crop.image[2, 2].astype(int) - de[:, 75, 10]).max() <= 2


def test_grey_float_and_nan_nodata(tmp_path):
    tif = tmp_path / 'dem_like.tif'
    rng = np.random.default_rng(0)
    data = np.repeat(np.repeat(rng.uniform(100.0, 300.0, (1, 8, 8)), 40, 1), 40, 2)
    data = data.astype(np.float32)
    data[:, :, :80] = np.nan
    crs, transform = 'EPSG:32632', from_origin(465000, 5247000, 0.5, 0.5)
    write_geotiff(tif, data, crs, transform, nodata=float('nan'))
    out = build_mbtiles([tif], tmp_path / 'f.mbtiles', fmt='png', workers=1, progress=False)
    valid = data[0][:, 80:]
    lo, hi = np.percentile(valid, [2, 98])
    with open_store(out) as store:
        lat, lon = pixel_latlon(tif, 180, 220)
        crop = render_crop(store, lat, lon, 4.0, 5)
        want = np.clip((data[0, 180, 220] - lo) * 255 / (hi - lo) + 0.5, 0, 255)
        rgb = crop.image[2, 2].astype(int)
        assert rgb[0] == rgb[1] == rgb[2] and abs(rgb[0] - want) <= 2
        lat, lon = pixel_latlon(tif, 180, 20)
        assert render_crop(store, lat, lon, 4.0, 5).coverage == 0.0


def test_bad_inputs_raise_before_writing_anything(ortho, tmp_path):
    nocrs = write_no_crs(tmp_path / 'nocrs.tif', bands=1)
    text = tmp_path / 'notes.tif'
    text.write_text('not a raster')
    far = tmp_path / 'far.tif'
    make_raster(far, size=(64, 64), lat=LAT0 + 0.5)
    out = tmp_path / 'x.mbtiles'
    cases = [
        (dict(inputs=[tmp_path / 'missing.tif']), 'missing.tif: no such file'),
        (dict(inputs=[text]), 'notes.tif: not a raster'),
        (dict(inputs=[nocrs]), 'nocrs.tif: has no CRS'),
        (dict(inputs=[ortho, far]), 'far.tif: does not overlap'),
        (dict(inputs=[ortho], max_zoom=25), 'max zoom 25 is out of range'),
        (dict(inputs=[ortho], min_zoom=19, max_zoom=15), 'min zoom 19 is above max zoom 15'),
        (dict(inputs=[ortho], fmt='tiff'), "format 'tiff' is not supported"),
        (dict(inputs=[ortho], quality=0), 'quality 0 is out of range'),
    ]
    for kwargs, words in cases:
        with pytest.raises(InputError) as info:
            build_mbtiles(output=out, workers=1, progress=False, **kwargs)
        assert words in str(info.value) and '\n' not in str(info.value)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == ['far.tif', 'nocrs.tif', 'notes.tif']


_KILLER = """
import os, signal, sys
sys.path[:0] = [{root!r}]
from geozoom_ros.tiles.build import build_mbtiles

def stop(stage, done, total):
    if done == 3:
        os.kill(os.getpid(), signal.SIGKILL)

build_mbtiles([{tif!r}], {out!r}, max_zoom=21, workers=1, progress=False, on_progress=stop)
"""


def test_killed_build_resumes_without_redoing_work(ortho, tmp_path):
    ref = build_mbtiles([ortho], tmp_path / 'ref.mbtiles', max_zoom=21, workers=1,
                        progress=False)
    out = tmp_path / 'map.mbtiles'
    partial = tmp_path / 'map.mbtiles.partial'
    script = _KILLER.format(root=ROOT, tif=str(ortho), out=str(out))
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert partial.exists() and not out.exists()
    meta = _meta(partial)
    assert sum(k.startswith('geozoom_build_done_chunk:') for k in meta) == 3
    assert {k[0] for k in _tiles(partial)} == {21}
    # Ctrl-C during the overviews of the re-run keeps the partial file too.
    seen = []

    def interrupt(stage, done, total):
        seen.append((stage, done))
        if stage == 'zoom 19':
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_mbtiles([ortho], out, max_zoom=21, workers=1, progress=False,
                      on_progress=interrupt)
    assert seen[0] == ('zoom 21', 4)  # the three chunks done before the kill were skipped
    assert partial.exists() and not out.exists()
    stages = []
    build_mbtiles([ortho], out, max_zoom=21, workers=2, progress=False,
                  on_progress=lambda stage, done, total: stages.append(stage))
    assert 'zoom 21' not in stages and 'zoom 20' not in stages
    assert not partial.exists()
    assert _tiles(out) == _tiles(ref)
    with open_store(out) as store:
        assert verify_pyramid(store) == []


def test_partial_from_other_settings_or_garbage_is_rebuilt(ortho, tmp_path):
    out = tmp_path / 'm.mbtiles'
    partial = tmp_path / 'm.mbtiles.partial'
    partial.write_bytes(b'garbage' * 100)
    build_mbtiles([ortho], out, workers=1, progress=False, fmt='png')
    ref = _tiles(out)

    def stop(stage, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_mbtiles([ortho], out, workers=1, progress=False, fmt='jpeg', on_progress=stop)
    assert partial.exists()
    build_mbtiles([ortho], out, workers=1, progress=False, fmt='png')
    assert _tiles(out) == ref and _meta(out)['format'] == 'png'


@pytest.mark.parametrize('dtype', ['uint8', 'uint16'])
def test_grey_with_alpha_band(tmp_path, dtype):
    tif = tmp_path / 'ga.tif'
    data = make_raster(tif, bands=1, dtype=dtype, size=(200, 200), alpha=True, alpha_cols=60)
    with rasterio.open(tif) as src:
        assert src.count == 2
    out = build_mbtiles([tif], tmp_path / 'ga.mbtiles', fmt='png', workers=1, progress=False)
    grey = data[0].astype(np.float64)
    if dtype == 'uint16':
        lo, hi = np.percentile(grey[:, 60:], [2, 98])
        grey = np.clip((grey - lo) * 255 / (hi - lo) + 0.5, 0, 255).astype(np.uint8)
    with open_store(out) as store:
        lat, lon = pixel_latlon(tif, 125, 125)
        rgb = render_crop(store, lat, lon, 3.0, 5).image[2, 2].astype(int)
        assert rgb[0] == rgb[1] == rgb[2] and abs(rgb[0] - int(grey[125, 125])) <= 2
        lat, lon = pixel_latlon(tif, 125, 25)
        assert render_crop(store, lat, lon, 3.0, 5).coverage == 0.0
