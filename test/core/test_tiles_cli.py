"""`geozoom tiles build|info|verify|view` through the real CLI entry point."""

import json
import shutil
import sqlite3

import cv2
import numpy as np
import pytest
from rasters import LAT0, LON0, make_raster, write_no_crs

from geozoom_ros import geo
from geozoom_ros.cli import main


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('cli')
    make_raster(d / 'ortho.tif', crs='utm', size=(400, 400), gsd_m=0.5)
    make_raster(d / 'far.tif', size=(64, 64), lat=LAT0 + 0.3)
    write_no_crs(d / 'nocrs.tif')
    (d / 'notes.tif').write_text('just text')
    make_raster(d / 'whole.tif', size=(600, 600))
    whole = (d / 'whole.tif').read_bytes()
    (d / 'cut.tif').write_bytes(whole[:len(whole) * 6 // 10])
    assert main(['tiles', 'build', str(d / 'ortho.tif'), '-o', str(d / 'map.mbtiles'),
                 '--quiet', '--workers', '1', '--format', 'png']) == 0
    (d / 'junk.mbtiles').write_bytes(bytes(range(256)) * 40)
    data = (d / 'map.mbtiles').read_bytes()
    (d / 'truncated.mbtiles').write_bytes(data[:len(data) // 3])
    shutil.copy(d / 'map.mbtiles', d / 'vector.mbtiles')
    conn = sqlite3.connect(d / 'vector.mbtiles')
    conn.execute("UPDATE metadata SET value='pbf' WHERE name='format'")
    conn.commit()
    conn.close()
    return d


def test_build_info_verify_view(files, tmp_path, capsys):
    out = tmp_path / 'm.mbtiles'
    rc, _, _ = _run(capsys, 'tiles', 'build', files / 'ortho.tif', '-o', out, '--max-zoom',
                    '19', '--min-zoom', '16', '--quality', '80', '--quiet')
    assert rc == 0 and out.exists()
    rc, text, _ = _run(capsys, 'tiles', 'info', out, '--json')
    info = json.loads(text)
    assert rc == 0 and info['format'] == 'jpg' and (info['minzoom'], info['maxzoom']) == (16, 19)
    assert sorted(info['tiles_per_zoom']) == ['16', '17', '18', '19']
    assert info['tiles'] == sum(info['tiles_per_zoom'].values())
    assert 0 < info['tile_bytes'] <= info['file_bytes']
    rc, text, _ = _run(capsys, 'tiles', 'info', out)
    assert rc == 0 and 'zooms       16..19' in text and 'bounds' in text
    rc, text, _ = _run(capsys, 'tiles', 'verify', out, '--quiet')
    assert rc == 0 and 'OK' in text
    view = tmp_path / 'view.png'
    rc, text, _ = _run(capsys, 'tiles', 'view', out, '--latlon', f'{LAT0},{LON0}', '--zoom',
                       '18', '--size', '200', '-o', view)
    assert rc == 0 and 'coverage 1.000' in text
    img = cv2.imread(str(view))
    assert img.shape == (200, 200, 3) and img.std() > 10
    cell = geo.cell_at(LAT0, LON0, 18)
    rc, _, _ = _run(capsys, 'tiles', 'view', out, '--cell', f'18/{cell.x}/{cell.y}', '-o',
                    tmp_path / 'same.png', '--size', '200')
    assert rc == 0
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / 'same.png')), img)


def test_verify_finds_a_missing_tile(files, tmp_path, capsys):
    broken = tmp_path / 'broken.mbtiles'
    shutil.copy(files / 'map.mbtiles', broken)
    conn = sqlite3.connect(broken)
    conn.execute('DELETE FROM tiles WHERE rowid = (SELECT max(rowid) FROM tiles WHERE '
                 'zoom_level = (SELECT max(zoom_level) FROM tiles))')
    conn.commit()
    conn.close()
    rc, _, err = _run(capsys, 'tiles', 'verify', broken, '--quiet')
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'broken.mbtiles: FAILED' in lines[0]


BAD = [
    (['tiles', 'build', '{d}/missing.tif', '-o', '{t}/o.mbtiles'], 'missing.tif: no such file'),
    (['tiles', 'build', '{d}/notes.tif', '-o', '{t}/o.mbtiles'], 'notes.tif: not a raster'),
    (['tiles', 'build', '{d}/nocrs.tif', '-o', '{t}/o.mbtiles'], 'nocrs.tif: has no CRS'),
    (['tiles', 'build', '{d}/ortho.tif', '{d}/far.tif', '-o', '{t}/o.mbtiles'],
     'far.tif: does not overlap'),
    (['tiles', 'build', '{d}/ortho.tif', '-o', '{t}/o.mbtiles', '--max-zoom', '25'],
     'max zoom 25 is out of range'),
    (['tiles', 'build', '{d}/ortho.tif', '-o', '{t}/o.mbtiles', '--min-zoom', '18',
      '--max-zoom', '15'], 'min zoom 18 is above max zoom 15'),
    (['tiles', 'build', '{d}/ortho.tif', '-o', '{t}/o.mbtiles', '--format', 'tiff'],
     "format 'tiff' is not supported"),
    (['tiles', 'build', '{d}/ortho.tif', '-o', '{t}/nodir/o.mbtiles'], 'does not exist'),
    (['tiles', 'build', '{d}/cut.tif', '-o', '{t}/o.mbtiles', '--quiet'],
     'cut.tif: read failed'),
    (['tiles', 'info', '{d}/junk.mbtiles'], 'junk.mbtiles: not an MBTiles'),
    (['tiles', 'verify', '{d}/truncated.mbtiles'], 'truncated.mbtiles: truncated'),
    (['tiles', 'info', '{d}/vector.mbtiles'], "vector.mbtiles: unsupported tile format 'pbf'"),
    (['tiles', 'info', '{d}/ortho.tif'], 'ortho.tif: not an MBTiles'),
    (['tiles', 'view', '{d}/missing.mbtiles', '--cell', '1/0/0', '-o', '{t}/v.png'],
     'missing.mbtiles: no such file'),
    (['tiles', 'view', '{d}/map.mbtiles', '--cell', '3/9/1', '-o', '{t}/v.png'],
     '--cell 3/9/1'),
    (['tiles', 'view', '{d}/map.mbtiles', '--latlon', '47.3,8.5', '-o', '{t}/v.png'],
     '--latlon needs --zoom'),
]


@pytest.mark.parametrize('argv,words', BAD, ids=[w for _, w in BAD])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, argv, words):
    argv = [a.format(d=files, t=tmp_path) for a in argv]
    rc, out, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith('geozoom tiles: error:')
    assert 'Traceback' not in err
    assert list(tmp_path.iterdir()) == []
