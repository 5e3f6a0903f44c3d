"""`geozoom world make|preview`: generate synthetic cross-view worlds and look at them."""

from geozoom_ros.errors import InputError


def register(sub):
    """Add the `geozoom world` subcommands."""
    parser = sub.add_parser('world', help='generate and preview synthetic cross-view worlds')
    wsub = parser.add_subparsers(dest='world_command', metavar='WORLD_COMMAND')
    wsub.required = True

    p = wsub.add_parser('make', help='generate a city: orthophoto, pyramid, ground views, '
                                     'drive bag')
    p.add_argument('--seed', type=int, required=True, help='city seed (a new seed, a new city)')
    p.add_argument('--size-m', type=float, required=True, help='city side in metres')
    p.add_argument('--origin', required=True, metavar='LAT,LON',
                   help='centre of the city in degrees, e.g. 48.137,11.575')
    p.add_argument('--style', default='summer', help='summer, autumn or winter (summer)')
    p.add_argument('-o', '--output', required=True, metavar='DIR', help='output folder')
    p.add_argument('--n-ground', type=int, default=2000, help='ground views (2000)')
    p.add_argument('--ground-size', default=None, metavar='WxH',
                   help='ground view size in pixels (512x384; 1024x256 for pano)')
    p.add_argument('--preset', default='street', help='street, drone or pano (street)')
    p.add_argument('--difficulty', default='default', help='easy, default or hard (default)')
    p.add_argument('--knob', action='append', default=[], metavar='NAME=VALUE',
                   help='override a difficulty knob, e.g. palette_size=6 (repeatable)')
    p.add_argument('--no-drive', action='store_true', help='do not write the drive bag')
    p.add_argument('--drive-size', default='320x240', metavar='WxH',
                   help='camera image size of the drive bag in pixels (320x240)')
    p.add_argument('--no-mbtiles', action='store_true', help='do not build map.mbtiles')
    p.add_argument('--workers', type=int, default=None,
                   help='render processes (default: all cores)')
    p.add_argument('--quiet', action='store_true', help='no progress output')
    p.set_defaults(func=_make)

    p = wsub.add_parser('preview', help='contact sheet: orthophoto with camera wedges and the '
                                        'matching ground views')
    p.add_argument('world', metavar='DIR', help='a folder written by `geozoom world make`')
    p.add_argument('-o', '--output', required=True, metavar='sheet.png')
    p.add_argument('--n', type=int, default=8, help='ground views shown (8)')
    p.add_argument('--split', default=None, help='only views of this split')
    p.set_defaults(func=_preview)


def _parse_size(text, flag='--ground-size'):
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise InputError(f'{flag} {text!r} is not WxH in pixels (e.g. 512x384)')
    return w, h


def _parse_knobs(items):
    import json
    knobs = {}
    for item in items:
        if '=' not in item:
            raise InputError(f'--knob {item!r} is not NAME=VALUE')
        name, value = item.split('=', 1)
        try:
            knobs[name.strip()] = json.loads(value)
        except ValueError:
            raise InputError(f'--knob {item!r}: the value is not a number or a JSON list')
    return knobs or None


def _make(args):
    from geozoom_ros.world.make import make_world, parse_origin
    origin = parse_origin(args.origin)
    if not args.size_m > 0:
        raise InputError(f'--size-m {args.size_m:g} must be positive (metres, e.g. 1000)')
    size = _parse_size(args.ground_size) if args.ground_size else None
    make_world(args.output, args.seed, args.size_m, origin, args.style, n_ground=args.n_ground,
               ground_size=size, knobs=_parse_knobs(args.knob), workers=args.workers,
               progress=not args.quiet, drive=not args.no_drive, preset=args.preset,
               difficulty=args.difficulty, mbtiles=not args.no_mbtiles,
               drive_size=_parse_size(args.drive_size, '--drive-size'))
    return 0


def _preview(args):
    from geozoom_ros.world.preview import make_preview
    path = make_preview(args.world, args.output, n=args.n, split=args.split)
    print(path)
    return 0
