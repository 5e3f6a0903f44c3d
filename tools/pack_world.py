"""Make a compact copy of a generated world for training on another machine.

Usage:
    python tools/pack_world.py WORLD OUT [--ground-size 147x110] [--quality 70]
        [--map-quality 60]

WORLD is a folder written by `geozoom world make` (``map.mbtiles`` and ``ground/index.csv``).
OUT gets the same layout, smaller:
- ground views of the training and validation splits at ``--ground-size``, JPEG ``--quality``:
  by default the size the training loader keeps for a 128x96 model (ground size times
  ``GROUND_MARGIN``), so training on the copy sees what it would see on the original, bar the
  JPEG round trip;
- the held-out views (every other split) as 32x24 thumbnails: training reads only which cells
  they fall in (those cells leave the training softmax), never their pixels. Evaluate on the
  original world, not on the copy;
- ``map.mbtiles`` with its JPEG tiles re-encoded at ``--map-quality`` (other tiles as they are);
- ``index.csv`` with the new image sizes.

OUT is built in a temporary folder beside it and renamed into place when complete, so a
failure leaves no partial copy; an existing OUT is refused. Split OUT into parts that fit a
transfer with ``tar`` (e.g. ``tar cf part1.tar -T list1``) and join them where it lands.
"""

import argparse
import csv
from pathlib import Path
import shutil
import sqlite3
import sys
import tempfile

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from geozoom_ros.errors import InputError  # noqa: E402

#: The splits a training run reads pixels of.
PIXEL_SPLITS = ('train', 'val')
THUMBNAIL = (32, 24)


def _size(text):
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: give WIDTHxHEIGHT, e.g. 147x110') from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f'{text!r}: sides must be at least 8 px')
    return w, h


def _quality(text):
    try:
        q = int(text)
    except ValueError:
        q = -1
    if not 1 <= q <= 100:
        raise argparse.ArgumentTypeError(f'{text!r}: give a JPEG quality from 1 to 100')
    return q


def _jpeg(img, quality):
    return cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])[1].tobytes()


def pack_ground(index, out_dir, size, quality):
    """Re-encode the views of ``index`` into ``out_dir``; return the number of views by kind."""
    index = Path(index)
    with open(index, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or 'path' not in rows[0] or 'split' not in rows[0]:
        raise InputError(f'{index}: expected an index.csv from geozoom world make (with path '
                         'and split columns)')
    counts = {'full': 0, 'thumbnail': 0}
    for r in rows:
        src = index.parent / r['path']
        img = cv2.imdecode(np.fromfile(src, np.uint8), cv2.IMREAD_COLOR) \
            if src.is_file() else None
        if img is None:
            raise InputError(f'{src}: missing or unreadable image (line of {r["path"]} in '
                             f'{index}); repair the world or remake it')
        full = r['split'] in PIXEL_SPLITS
        wh = size if full else THUMBNAIL
        img = cv2.resize(img, wh, interpolation=cv2.INTER_AREA)
        dst = Path(out_dir) / r['path']
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(_jpeg(img, quality if full else 50))
        counts['full' if full else 'thumbnail'] += 1
        if 'width' in r:
            r['width'], r['height'] = wh
    with open(Path(out_dir) / 'index.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return counts


def pack_map(src, dst, quality):
    """Copy MBTiles ``src`` to ``dst`` with its JPEG tiles re-encoded; return tiles re-encoded."""
    shutil.copyfile(src, dst)
    n = 0
    conn = sqlite3.connect(dst)
    try:
        rows = conn.execute('SELECT zoom_level, tile_column, tile_row, tile_data '
                            'FROM tiles').fetchall()
        for z, x, y, data in rows:
            if bytes(data[:3]) != b'\xff\xd8\xff':  # PNG/WebP (alpha) stay as they are
                continue
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise InputError(f'{src}: tile {z}/{x}/{y} does not decode; check the map '
                                 'with geozoom tiles verify')
            conn.execute('UPDATE tiles SET tile_data = ? WHERE zoom_level = ? AND '
                         'tile_column = ? AND tile_row = ?', (_jpeg(img, quality), z, x, y))
            n += 1
        conn.commit()
        conn.execute('VACUUM')
    except sqlite3.DatabaseError as exc:
        raise InputError(f'{src}: not a readable MBTiles file ({exc})') from None
    finally:
        conn.close()
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('world', type=Path, help='a folder written by geozoom world make')
    p.add_argument('out', type=Path, help='the compact copy (created)')
    p.add_argument('--ground-size', type=_size, default=(147, 110),
                   help='training/validation views, WIDTHxHEIGHT (147x110)')
    p.add_argument('--quality', type=_quality, default=70, help='their JPEG quality (70)')
    p.add_argument('--map-quality', type=_quality, default=60,
                   help='map tiles JPEG quality (60)')
    args = p.parse_args(argv)
    try:
        for name in ('map.mbtiles', 'ground/index.csv'):
            if not (args.world / name).is_file():
                raise InputError(f'{args.world / name} does not exist; pass a folder written '
                                 'by geozoom world make')
        if args.out.exists():
            raise InputError(f'{args.out} already exists; remove it or name another folder')
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{args.out.name}.', dir=args.out.parent))
        try:
            counts = pack_ground(args.world / 'ground/index.csv', tmp / 'ground',
                                 args.ground_size, args.quality)
            tiles = pack_map(args.world / 'map.mbtiles', tmp / 'map.mbtiles',
                             args.map_quality)
            tmp.rename(args.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except InputError as exc:
        print(f'pack_world: {exc}', file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file())
    print(f'{args.out}: {counts["full"]} views at {args.ground_size[0]}x{args.ground_size[1]}, '
          f'{counts["thumbnail"]} held-out thumbnails, {tiles} map tiles re-encoded; '
          f'{size / 1e6:.1f} MB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
