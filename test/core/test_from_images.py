"""Bring-your-own data: index.csv and drive bags from JPEGs with EXIF GPS (written here)."""

import csv
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image
import pytest

from geozoom_ros.cli import main
from geozoom_ros.eval import bag as B
from geozoom_ros.eval import bagcli as BC

# name -> (lat, lon, heading or None, EXIF time or None)
PHOTOS = {
    'c_first.jpg': (47.3700, 8.5400, 90.0, '2024:05:01 12:00:00'),
    'b_second.jpg': (47.3702, 8.5402, None, '2024:05:01 12:00:01'),
    'a_third.JPG': (47.3704, 8.5404, 275.5, '2024:05:01 12:00:01'),
    'sub/d_fourth.jpeg': (-33.8650, -151.2094, 10.0, '2024:05:01 12:00:03'),
}


def _dms(v):
    v = abs(v)
    d = int(v)
    m = int((v - d) * 60)
    s = (v - d - m / 60.0) * 3600.0
    return (float(d), float(m), round(s, 4))


def _write_photo(path, lat, lon, heading=None, when=None, value=100, size=(64, 48),
                 focal35=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = 'N' if lat >= 0 else 'S'
    gps[ExifTags.GPS.GPSLatitude] = _dms(lat)
    gps[ExifTags.GPS.GPSLongitudeRef] = 'E' if lon >= 0 else 'W'
    gps[ExifTags.GPS.GPSLongitude] = _dms(lon)
    if heading is not None:
        gps[ExifTags.GPS.GPSImgDirectionRef] = 'T'
        gps[ExifTags.GPS.GPSImgDirection] = heading
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    if when:
        sub[ExifTags.Base.DateTimeOriginal] = when
    if focal35:
        sub[ExifTags.Base.FocalLengthIn35mmFilm] = focal35
    img.save(path, exif=exif, quality=90)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / 'photos'
    for i, (name, (lat, lon, heading, when)) in enumerate(PHOTOS.items()):
        _write_photo(folder / name, lat, lon, heading, when, value=i)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / 'no_gps.jpg')
    (folder / 'broken.jpg').write_bytes(b'not a jpeg at all')
    (folder / 'notes.txt').write_text('ignored')
    return folder


def test_read_geotag_values(photos):
    tag, why = BC.read_geotag(photos / 'sub' / 'd_fourth.jpeg')
    assert why is None
    assert tag.lat == pytest.approx(-33.8650, abs=1e-6)
    assert tag.lon == pytest.approx(-151.2094, abs=1e-6)
    assert tag.heading_deg == pytest.approx(10.0) and tag.time_s is not None
    assert BC.read_geotag(photos / 'no_gps.jpg') == (None, 'no EXIF GPS position')
    assert BC.read_geotag(photos / 'broken.jpg')[1].startswith('unreadable image')


def test_dataset_from_images_writes_the_index(photos, tmp_path, capsys):
    out = tmp_path / 'data' / 'index.csv'
    assert main(['dataset', 'from-images', str(photos), '-o', str(out)]) == 0
    io = capsys.readouterr()
    assert '4 geotagged images' in io.out
    assert 'no EXIF GPS position' in io.err and 'unreadable image' in io.err
    rows = list(csv.DictReader(out.open()))
    assert [r for r in rows[0]] == ['path', 'lat', 'lon', 'heading_deg', 'split']
    by_name = {Path(r['path']).name: r for r in rows}
    assert set(by_name) == {Path(n).name for n in PHOTOS}
    for name, (lat, lon, heading, _) in PHOTOS.items():
        r = by_name[Path(name).name]
        assert float(r['lat']) == pytest.approx(lat, abs=1e-6)
        assert float(r['lon']) == pytest.approx(lon, abs=1e-6)
        assert r['heading_deg'] == ('' if heading is None else f'{heading:.2f}')
        assert (out.parent / r['path']).resolve() == (photos / name).resolve()
        assert r['split'] in ('train', 'val')
    # Sydney and Zurich are different blocks; at least one block is val.
    assert {r['split'] for r in rows} == {'train', 'val'}
    assert main(['dataset', 'from-images', str(photos), '-o', str(out), '--split', 'test']) == 0
    assert {r['split'] for r in csv.DictReader(out.open())} == {'test'}
    assert not [p for p in out.parent.iterdir() if p.name.startswith('.')]


def test_no_geotagged_images_is_one_line(tmp_path, capsys):
    folder = tmp_path / 'plain'
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / 'x.jpg')
    assert main(['dataset', 'from-images', str(folder), '-o', str(tmp_path / 'i.csv')]) == 2
    err = capsys.readouterr().err.strip()
    assert 'none of the 1 JPEGs' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'i.csv').exists()
    assert main(['bag', 'from-images', str(tmp_path / 'nowhere'), '-o',
                 str(tmp_path / 'b')]) == 2
    assert 'is not a folder' in capsys.readouterr().err


def test_frame_times_order_and_ties():
    tags = [BC.GeoTag(Path(n), 0.0, 0.0, time_s=t) for n, t in
            (('b', 10.0), ('a', 11.0), ('c', 11.0), ('d', 12.0), ('e', 12.0))]
    ordered, times, used = BC.frame_times(tags, 'auto')
    assert used == 'time' and [t.path.name for t in ordered] == ['b', 'a', 'c', 'd', 'e']
    assert times == pytest.approx([0.0, 1.0, 1.5, 2.0, 2.5])
    tags.append(BC.GeoTag(Path('0'), 0.0, 0.0))
    ordered, times, used = BC.frame_times(tags, 'auto', rate_hz=2.0)
    assert used == 'name' and [t.path.name for t in ordered][:2] == ['0', 'a']
    assert times[:3] == [0.0, 0.5, 1.0]
    with pytest.raises(Exception, match='has no EXIF time'):
        BC.frame_times(tags, 'time')


def test_bag_from_images_reads_back_in_time_order(photos, tmp_path, capsys):
    # Only the Zurich frames, plus one with a focal length for the field of view.
    folder = tmp_path / 'drive_photos'
    for i, (name, (lat, lon, heading, when)) in enumerate(list(PHOTOS.items())[:3]):
        _write_photo(folder / name, lat, lon, heading, when, value=i, size=(1600, 1200),
                     focal35=24.0 if i == 0 else None)
    out = tmp_path / 'mydrive'
    rc = main(['bag', 'from-images', str(folder), '-o', str(out), '--no-progress',
               '--max-width', '400'])
    text = capsys.readouterr().out
    assert rc == 0 and '3 frames in time order' in text and '73.7 deg' in text
    bag = B.read_bag(out, quiet=True)
    assert bag.image_topic == '/camera/image_raw/compressed' and bag.n_images == 3
    # Time order: c_first, then the two frames of the same second (by name: a, b), spread.
    np.testing.assert_allclose(bag.gt.lat, [47.3700, 47.3704, 47.3702], atol=1e-7)
    np.testing.assert_allclose(bag.gt.t - bag.gt.t[0], [0.0, 1.0, 1.5], atol=1e-6)
    frames = list(bag.images())
    assert frames[0].rgb.shape == (300, 400, 3)
    assert bag.metadata['source']['order'] == 'time'
    # The output exists: refused without --overwrite.
    assert main(['bag', 'from-images', str(folder), '-o', str(out), '--no-progress']) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert main(['bag', 'from-images', str(folder), '-o', str(out), '--no-progress',
                 '--overwrite', '--order', 'name', '--storage', 'sqlite3']) == 0
    bag = B.read_bag(out, quiet=True)
    np.testing.assert_allclose(bag.gt.lat, [47.3704, 47.3702, 47.3700], atol=1e-7)
