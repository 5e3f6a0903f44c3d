"""`geozoom tiles build|info|verify|view`: build, inspect, check and look at tile pyramids."""

import os
import pathlib

from geozoom_ros.errors import InputError


def register(sub):
    """Add the `geozoom tiles` subcommands."""
    parser = sub.add_parser('tiles', help='build, inspect, verify and view tile pyramids')
    tsub = parser.add_subparsers(dest='tiles_command', metavar='TILES_COMMAND')
    tsub.required = True

    p = tsub.add_parser('build', help='build an MBTiles pyramid from GeoTIFF / COG orthophotos')
    p.add_argument('inputs', nargs='+', metavar='ORTHO.tif', help='input rasters (any CRS)')
    p.add_argument('-o', '--output', required=True, metavar='MAP.mbtiles')
    p.add_argument('--min-zoom', type=int, default=None,
                   help='lowest zoom (default: the map fits in about one tile)')
    p.add_argument('--max-zoom', type=int, default=None,
                   help='highest zoom (default: from the native ground sampling distance)')
    p.add_argument('--format', default='jpeg', metavar='jpeg|png|webp',
                   help='tile format (default jpeg)')
    p.add_argument('--quality', type=int, default=90, help='JPEG/WebP quality 1..100 (90)')
    p.add_argument('--workers', type=int, default=None,
                   help='worker processes (default: all cores)')
    p.add_argument('--name', default=None, help='map name (default: output file name)')
    p.add_argument('--attribution', default='', help='attribution text of the imagery')
    p.add_argument('--quiet', action='store_true', help='no progress output')
    p.set_defaults(func=_build)

    p = tsub.add_parser('info', help='print bounds, zooms, tiles per zoom, format and bytes')
    p.add_argument('map', metavar='MAP', help='MBTiles file or XYZ directory')
    p.add_argument('--json', action='store_true', help='print JSON')
    p.set_defaults(func=_info)

    p = tsub.add_parser('verify', help='check every tile decodes and the pyramid is complete')
    p.add_argument('map', metavar='MAP', help='MBTiles file or XYZ directory')
    p.add_argument('--quiet', action='store_true', help='no progress output')
    p.set_defaults(func=_verify)

    p = tsub.add_parser('view', help='render the overhead view of a cell to an image')
    p.add_argument('map', metavar='MAP', help='MBTiles file or XYZ directory')
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument('--cell', metavar='Z/X/Y', help='cell as zoom/x/y (XYZ scheme)')
    where.add_argument('--latlon', metavar='LAT,LON',
                       help='a point (degrees); needs --zoom; write --latlon=-33.9,151.2 '
                            'when the latitude is negative')
    p.add_argument('--zoom', type=int, default=None, help='cell zoom for --latlon')
    p.add_argument('--size', type=int, default=384, help='view side in pixels (384)')
    p.add_argument('-o', '--output', required=True, metavar='view.png')
    p.set_defaults(func=_view)


def _build(args):
    from geozoom_ros.tiles.build import build_mbtiles

    build_mbtiles(args.inputs, args.output, min_zoom=args.min_zoom, max_zoom=args.max_zoom,
                  fmt=args.format, quality=args.quality, workers=args.workers,
                  progress=not args.quiet, name=args.name, attribution=args.attribution)
    return 0


def map_info(store):
    """Return a JSON-ready dict describing a store: bounds, zooms, tiles per zoom, bytes."""
    meta = store.metadata
    counts = store.count_tiles()
    tile_bytes = store.tile_bytes()
    path = pathlib.Path(store.path)
    file_bytes = (path.stat().st_size if path.is_file()
                  else sum(p.stat().st_size for p in path.rglob('*') if p.is_file()))
    return {
        'path': str(path), 'name': meta.name, 'format': meta.format,
        'tile_size': meta.tile_size, 'bounds': list(meta.bounds), 'center': list(meta.center),
        'minzoom': meta.minzoom, 'maxzoom': meta.maxzoom, 'attribution': meta.attribution,
        'tiles_per_zoom': {str(z): n for z, n in counts.items()},
        'tiles': sum(counts.values()), 'tile_bytes': tile_bytes, 'file_bytes': file_bytes,
    }


def _info(args):
    import json

    from geozoom_ros.tiles.store import open_store

    with open_store(args.map) as store:
        info = map_info(store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    w, s, e, n = info['bounds']
    print(f"{info['path']}: {info['name']}")
    print(f"  format      {info['format']}, {info['tile_size']} px tiles")
    print(f'  bounds      W {w:.6f}  S {s:.6f}  E {e:.6f}  N {n:.6f} (degrees)')
    print(f"  zooms       {info['minzoom']}..{info['maxzoom']}")
    per_zoom = ', '.join(f'{z}: {c}' for z, c in info['tiles_per_zoom'].items())
    print(f'  tiles       {info["tiles"]} ({per_zoom})')
    print(f"  bytes       {info['tile_bytes']:,} in tiles, {info['file_bytes']:,} on disk")
    return 0


def _verify(args):
    import sys

    from geozoom_ros.tiles.store import open_store, verify_pyramid

    with open_store(args.map) as store:
        problems = verify_pyramid(store, progress=not args.quiet)
        counts = store.count_tiles()
        meta = store.metadata
    if problems:
        more = f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''
        print(f'{args.map}: FAILED: {problems[0]}{more}', file=sys.stderr)
        return 1
    print(f'{args.map}: OK ({sum(counts.values())} tiles, zooms {meta.minzoom}..'
          f'{meta.maxzoom}, every tile decodes, pyramid complete)')
    return 0


def parse_cell(text):
    """Parse ``Z/X/Y`` into a cell; raise InputError naming the flag when malformed."""
    from geozoom_ros import geo

    parts = str(text).split('/')
    try:
        z, x, y = (int(p) for p in parts)
    except ValueError:
        raise InputError(f'--cell {text!r} is not Z/X/Y (three integers)') from None
    if not 0 <= z <= 30 or not (0 <= x < 1 << z and 0 <= y < 1 << z):
        raise InputError(f'--cell {text}: x and y must lie in 0..2**z-1 and z in 0..30')
    return geo.Cell(x, y, z)


def _view(args):
    import cv2

    from geozoom_ros import geo
    from geozoom_ros.tiles.store import open_store
    from geozoom_ros.tiles.views import render_view

    if args.cell:
        if args.zoom is not None:
            raise InputError('--zoom goes with --latlon; --cell already gives the zoom')
        cell = parse_cell(args.cell)
    else:
        if args.zoom is None:
            raise InputError('--latlon needs --zoom Z (the cell zoom)')
        try:
            lat, lon = (float(v) for v in args.latlon.split(','))
        except ValueError:
            raise InputError(f'--latlon {args.latlon!r} is not LAT,LON in degrees') from None
        if not 0 <= args.zoom <= 30:
            raise InputError(f'--zoom {args.zoom} is out of range 0..30')
        cell = geo.cell_at(lat, lon, args.zoom)
    out = pathlib.Path(args.output)
    ext = out.suffix.lower()
    if ext not in ('.png', '.jpg', '.jpeg', '.webp'):
        raise InputError(f'{out}: give a .png, .jpg or .webp file name')
    if not out.parent.exists():
        raise InputError(f'{out}: its folder {out.parent} does not exist')
    with open_store(args.map) as store:
        view = render_view(store, cell, size=args.size)
    ok, buf = cv2.imencode(ext, cv2.cvtColor(view.image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f'{out}: OpenCV cannot write this image type')
    tmp = out.with_name(f'.{out.name}.tmp')
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, out)
    print(f'{out}: view of cell {cell.z}/{cell.x}/{cell.y} ({args.size} px, tiles of zoom '
          f'{view.zoom}, coverage {view.coverage:.3f})')
    return 0
