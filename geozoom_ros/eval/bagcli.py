"""`geozoom eval-bag`, `geozoom dataset from-images` and `geozoom bag from-images`.

- ``eval-bag``: replay a recorded drive through the localizer, score it against the bag's
  ground truth, replay the fusion with the odometry, and write a report folder (plots,
  ``metrics.json``, ``report.md``).
- ``dataset from-images``: an ``index.csv`` (path, lat, lon, heading_deg, split) from a folder
  of JPEGs with EXIF GPS tags, for training and ``geozoom eval``.
- ``bag from-images``: a drive bag (rosbag2) from a folder of geotagged frames, ordered by
  their EXIF time or by name, for ``eval-bag``.

Registration is cheap: torch, rosbags, Pillow and matplotlib are imported inside the commands.
"""

from dataclasses import dataclass
import math
import os
from pathlib import Path
import sys

from geozoom_ros.eval.cli import check_fusion, fusion_args
from geozoom_ros.fileio import atomic_write_text

JPEG_SUFFIXES = ('.jpg', '.jpeg')


def _default_threads():
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def register(sub):
    """Add the eval-bag, dataset and bag subcommands."""
    p = sub.add_parser(
        'eval-bag', help='replay a drive bag through the localizer: metrics, fusion, report',
        description='Localise the camera frames of a rosbag2 (sqlite3 or MCAP) with the '
                    'localizer the node runs, match the ground truth by timestamp, replay '
                    'odometry + fixes through the EKF of config/ekf.yaml, and write plots, '
                    'metrics.json and report.md.')
    p.add_argument('bag', metavar='BAG', help='rosbag2 folder (or its .mcap/.db3 file)')
    p.add_argument('--bundle', required=True, metavar='BUNDLE', help='map bundle')
    p.add_argument('--model', required=True, metavar='MODEL', help='model of the bundle')
    p.add_argument('-o', '--output', required=True, metavar='REPORT_DIR',
                   help='report folder (created; its files are replaced)')
    p.add_argument('--image-topic', default=None,
                   help='Image or CompressedImage topic (default: /camera/image_raw, its '
                        '/compressed, else the image topic with most messages)')
    p.add_argument('--gt-topic', default='/gps/fix_truth',
                   help='ground-truth sensor_msgs/NavSatFix topic (default /gps/fix_truth)')
    p.add_argument('--odom-topic', default=None,
                   help="nav_msgs/Odometry for the fusion (default: ekf.yaml's odom0)")
    p.add_argument('--imu-topic', default=None,
                   help="sensor_msgs/Imu for the fusion and the heading (default: ekf.yaml's "
                        "imu0; '' = none)")
    p.add_argument('--every', type=int, default=1, metavar='N', help='localise every Nth frame')
    p.add_argument('--limit', type=int, default=None, metavar='N',
                   help='localise at most N frames')
    p.add_argument('--backend', default='auto', help='auto, torch, onnxruntime or tensorrt')
    p.add_argument('--device', default=None, help="torch device (e.g. cpu, cuda)")
    p.add_argument('--method', default='zoom-beam', choices=('zoom-beam', 'zoom', 'zoom-fused'))
    p.add_argument('--beam-width', type=int, default=8, metavar='B')
    fusion_args(p)
    p.add_argument('--prior', default='none', choices=('none', 'fused'),
                   help='search prior: none (whole map) or fused (the EKF estimate so far, '
                        'as the node with prior_source odometry)')
    p.add_argument('--params', default=None, metavar='localize.yaml',
                   help="the node's parameters file for the gate (default: its defaults, as "
                        'config/localize.yaml)')
    p.add_argument('--min-confidence', type=float, default=None,
                   help='gate: this min_confidence (0..1) for every search, instead of the '
                        "thresholds fitted in the model's calibration.json")
    p.add_argument('--max-sigma-m', type=float, default=None,
                   help='gate: override max_sigma_m (metres)')
    p.add_argument('--ekf-config', default=None, metavar='ekf.yaml',
                   help='robot_localization config for the fusion (default config/ekf.yaml)')
    p.add_argument('--map', default=None, metavar='MAP',
                   help='map drawn under the trajectories: MBTiles, XYZ folder or GeoTIFF '
                        '(default: the pyramid the bundle was built from)')
    p.add_argument('--threads', type=int, default=_default_threads(),
                   help='torch CPU threads (default: half the cores, at most 4)')
    p.add_argument('--json', action='store_true', help='print metrics.json instead of a table')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=_eval_bag)

    p = sub.add_parser('dataset', help='make data sets from your own imagery')
    dsub = p.add_subparsers(dest='dataset_command', metavar='COMMAND')
    dsub.required = True
    q = dsub.add_parser('from-images', help='index.csv from a folder of JPEGs with EXIF GPS',
                        description='Write index.csv (path, lat, lon, heading_deg, split) from '
                                    'the EXIF GPS tags of the JPEGs under a folder. Splits are '
                                    'drawn by spatial blocks, so validation images are not '
                                    'next to training images.')
    q.add_argument('folder', metavar='DIR', help='folder of geotagged JPEGs (searched '
                                                 'recursively)')
    q.add_argument('-o', '--output', required=True, metavar='index.csv')
    q.add_argument('--split', default=None,
                   help='give every row this split (e.g. test) instead of train/val blocks')
    q.add_argument('--val-fraction', type=float, default=0.1,
                   help='share of spatial blocks marked val (default 0.1)')
    q.add_argument('--block-m', type=float, default=200.0,
                   help='side of the spatial blocks in metres (default 200)')
    q.add_argument('--seed', type=int, default=0)
    q.set_defaults(func=_dataset_from_images)

    p = sub.add_parser('bag', help='make drive bags from your own imagery')
    bsub = p.add_subparsers(dest='bag_command', metavar='COMMAND')
    bsub.required = True
    q = bsub.add_parser('from-images', help='a drive bag from a folder of geotagged frames',
                        description='Write a rosbag2 drive from the geotagged JPEGs under a '
                                    'folder, in EXIF time order (or name order): the frames '
                                    'as CompressedImage on /camera/image_raw/compressed and '
                                    'their EXIF positions as NavSatFix ground truth on '
                                    '/gps/fix_truth.')
    q.add_argument('folder', metavar='DIR')
    q.add_argument('-o', '--output', required=True, metavar='BAG', help='bag folder to write')
    q.add_argument('--order', default='auto', choices=('auto', 'time', 'name'),
                   help='frame order: EXIF time, file name, or auto (time when every frame '
                        'has one)')
    q.add_argument('--rate', type=float, default=1.0, metavar='HZ',
                   help='frame rate assumed in name order (default 1 Hz)')
    q.add_argument('--max-width', type=int, default=1024, metavar='PX',
                   help='frames wider than this are scaled down (default 1024; 0 = keep)')
    q.add_argument('--fov-deg', type=float, default=None,
                   help='horizontal field of view for CameraInfo (default: from EXIF '
                        'FocalLengthIn35mmFilm, else no CameraInfo)')
    q.add_argument('--storage', default='mcap', choices=('mcap', 'sqlite3'))
    q.add_argument('--raw', action='store_true',
                   help='also write raw sensor_msgs/Image frames (large)')
    q.add_argument('--overwrite', action='store_true', help='replace an existing bag')
    q.add_argument('--no-progress', action='store_true')
    q.set_defaults(func=_bag_from_images)


# --------------------------------------------------------------------------------------------
# eval-bag

def _set_threads(n):
    try:
        import torch
    except ImportError:
        return
    # Many threads per small inference oversubscribe a loaded CPU badly; a few suffice.
    torch.set_num_threads(max(1, int(n)))


def _eval_bag(args):
    from geozoom_ros.errors import InputError
    from geozoom_ros.eval import bag as B
    from geozoom_ros.eval.report import summary_rows, write_report

    if args.every < 1:
        raise InputError(f'--every {args.every} must be at least 1')
    if args.limit is not None and args.limit < 1:
        raise InputError(f'--limit {args.limit} must be at least 1')
    if args.beam_width < 1:
        raise InputError(f'--beam-width {args.beam_width} must be at least 1')
    if args.map and not Path(args.map).exists():
        raise InputError(f'--map {args.map} does not exist; pass an MBTiles file, XYZ folder '
                         'or GeoTIFF, or leave it out')
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f'-o {out} is a file; pass a folder for the report')
    gate = B.Gate.from_params_file(args.params) if args.params else B.Gate()
    if args.min_confidence is not None:
        if not 0.0 <= args.min_confidence <= 1.0:
            raise InputError(f'--min-confidence {args.min_confidence} must be in 0..1')
        gate.min_confidence, gate.gate_source = args.min_confidence, 'parameters'
    if args.max_sigma_m is not None:
        if not args.max_sigma_m > 0:
            raise InputError(f'--max-sigma-m {args.max_sigma_m} must be positive (metres)')
        gate.max_sigma_m = args.max_sigma_m
    check_fusion(args)
    _set_threads(args.threads)
    loc = None
    if args.device or args.method == 'zoom-fused':
        from geozoom_ros.localizer import GeoZoomLocalizer
        loc = GeoZoomLocalizer(args.bundle, args.model, backend=args.backend,
                               beam_width=args.beam_width, method=args.method,
                               retrieval_model=args.retrieval_model,
                               zoom_weight=args.zoom_weight,
                               **({'device': args.device} if args.device else {}))
    ev = B.evaluate_bag(args.bag, args.bundle, args.model, image_topic=args.image_topic,
                        gt_topic=args.gt_topic, odom_topic=args.odom_topic,
                        imu_topic=args.imu_topic, every=args.every, limit=args.limit,
                        backend=args.backend, beam_width=args.beam_width, method=args.method,
                        prior=args.prior, gate=gate, ekf_config=args.ekf_config,
                        progress=not args.no_progress, localizer=loc)
    report = write_report(ev, out, map_path=args.map)
    if args.json:
        print((out / 'metrics.json').read_text(), end='')
        return 0
    rows = summary_rows(ev.metrics)
    width = max(len(k) for k, _ in rows)
    print(f'geozoom eval-bag: {args.bag}')
    for k, v in rows:
        print(f'  {k:<{width}}  {v}')
    print(f'report: {report}')
    return 0


# --------------------------------------------------------------------------------------------
# EXIF geotags

@dataclass
class GeoTag:
    """The EXIF geotag of one image: degrees (WGS84), optional heading/time/altitude.

    ``heading_deg``: GPSImgDirection (degrees clockwise from north; true or magnetic north as
    the camera recorded it), ``time_s``: seconds since the Unix epoch (GPS UTC time, else
    DateTimeOriginal with its offset, taken as UTC when it has none), ``focal_35mm``: the 35 mm
    equivalent focal length (mm).
    """

    path: Path
    lat: float
    lon: float
    heading_deg: float = None
    time_s: float = None
    altitude_m: float = None
    focal_35mm: float = None


def _rational(v):
    try:
        return float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        if isinstance(v, tuple) and len(v) == 2 and v[1]:
            return float(v[0]) / float(v[1])
        raise


def _dms(v):
    vals = [_rational(x) for x in v] if isinstance(v, (tuple, list)) else [_rational(v)]
    vals += [0.0] * (3 - len(vals))
    d, m, s = vals[:3]
    return d + m / 60.0 + s / 3600.0


def _text(v):
    if isinstance(v, bytes):
        v = v.decode('ascii', 'ignore')
    return str(v).strip('\x00 ').strip() if v is not None else ''


def _exif_time(gps, exif_ifd, base):
    from datetime import datetime, timedelta, timezone

    date = _text(gps.get(29))
    if date and 7 in gps:
        try:
            h, m, s = (_rational(x) for x in gps[7])
            day = datetime.strptime(date, '%Y:%m:%d').replace(tzinfo=timezone.utc)
            return (day + timedelta(hours=h, minutes=m, seconds=s)).timestamp()
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    text = _text(exif_ifd.get(0x9003)) or _text(base.get(0x0132))
    if not text:
        return None
    try:
        when = datetime.strptime(text[:19], '%Y:%m:%d %H:%M:%S')
    except ValueError:
        return None
    offset = _text(exif_ifd.get(0x9011))
    tz = timezone.utc
    if len(offset) == 6 and offset[0] in '+-':
        try:
            sign = 1 if offset[0] == '+' else -1
            tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        except ValueError:
            tz = timezone.utc
    t = when.replace(tzinfo=tz).timestamp()
    sub = _text(exif_ifd.get(0x9291))
    if sub.isdigit():
        t += float('0.' + sub)
    return t


def read_geotag(path):
    """Return the :class:`GeoTag` of a JPEG, or ``(None, reason)`` when it has none.

    Returns ``(GeoTag, None)`` or ``(None, reason)``; never raises for a bad image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            exif = img.getexif()
            gps = dict(exif.get_ifd(0x8825))
            exif_ifd = dict(exif.get_ifd(0x8769))
            base = dict(exif)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        return None, f'unreadable image ({type(exc).__name__})'
    if 2 not in gps or 4 not in gps:
        return None, 'no EXIF GPS position'
    try:
        lat = _dms(gps[2]) * (-1.0 if _text(gps.get(1, 'N')).upper() == 'S' else 1.0)
        lon = _dms(gps[4]) * (-1.0 if _text(gps.get(3, 'E')).upper() == 'W' else 1.0)
    except (TypeError, ValueError, ZeroDivisionError):
        return None, 'malformed EXIF GPS position'
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and
            -180 <= lon <= 180):
        return None, 'EXIF GPS position out of range'
    if lat == 0.0 and lon == 0.0:
        return None, 'EXIF GPS position is 0, 0 (no fix)'
    tag = GeoTag(Path(path), lat, lon)
    try:
        if 17 in gps:
            h = _rational(gps[17])
            tag.heading_deg = h % 360.0 if math.isfinite(h) else None
        if 6 in gps:
            alt = _rational(gps[6])
            ref = gps.get(5, 0)
            below = (ref[0] if isinstance(ref, bytes) and ref else ref) == 1
            tag.altitude_m = -alt if below else alt
        if 0xA405 in exif_ifd:
            f35 = _rational(exif_ifd[0xA405])
            tag.focal_35mm = f35 if f35 > 0 else None
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    tag.time_s = _exif_time(gps, exif_ifd, base)
    return tag, None


def scan_geotagged(folder):
    """Return ``(tags, skipped)`` of the JPEGs under ``folder``.

    ``tags``: the :class:`GeoTag` of every geotagged JPEG (sorted by path); ``skipped``:
    ``{reason: [paths]}`` of the others. Raises InputError when there is nothing to use.
    """
    from geozoom_ros.errors import InputError

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f'{folder} is not a folder; pass the folder that holds the JPEGs')
    files = sorted(p for p in folder.rglob('*') if p.is_file() and
                   p.suffix.lower() in JPEG_SUFFIXES)
    if not files:
        raise InputError(f'{folder} holds no .jpg/.jpeg files; pass a folder of geotagged '
                         'JPEGs')
    tags, skipped = [], {}
    for p in files:
        tag, why = read_geotag(p)
        if tag is None:
            skipped.setdefault(why, []).append(str(p))
        else:
            tags.append(tag)
    if not tags:
        reasons = '; '.join(f'{k}: {len(v)}' for k, v in skipped.items())
        raise InputError(f'none of the {len(files)} JPEGs under {folder} has a usable EXIF GPS '
                         f'position ({reasons}); geotag them (e.g. exiftool -geotag)')
    return tags, skipped


def _report_skipped(skipped, what):
    for reason, paths in skipped.items():
        print(f'geozoom {what}: skipped {len(paths)} image(s): {reason} (e.g. {paths[0]})',
              file=sys.stderr)


def block_splits(tags, val_fraction=0.1, block_m=200.0, seed=0):
    """Return a 'train'/'val' split per tag, drawn per spatial block of ``block_m`` metres.

    Whole blocks go to val (each with probability ``val_fraction``), so no validation image
    has a training image a few metres away; with two or more blocks at least one is val when
    ``val_fraction`` > 0.
    """
    import numpy as np

    from geozoom_ros.geo import LocalFrame

    lat0 = float(np.mean([t.lat for t in tags]))
    lon0 = float(np.mean([t.lon for t in tags]))
    frame = LocalFrame(lat0, lon0)
    e, n, _ = frame.to_enu(np.array([t.lat for t in tags]), np.array([t.lon for t in tags]),
                           np.zeros(len(tags)))
    bx = np.floor(np.atleast_1d(e) / block_m).astype(np.int64)
    by = np.floor(np.atleast_1d(n) / block_m).astype(np.int64)
    blocks = sorted(set(zip(bx.tolist(), by.tolist())))
    draw = {b: float(np.random.default_rng([seed, b[0] + 2 ** 31, b[1] + 2 ** 31]).random())
            for b in blocks}
    val = {b for b in blocks if draw[b] < val_fraction}
    if not val and len(blocks) >= 2 and val_fraction > 0:
        val = {min(blocks, key=draw.get)}
    return ['val' if (x, y) in val else 'train' for x, y in zip(bx.tolist(), by.tolist())]


def write_index_from_images(folder, out_csv, split=None, val_fraction=0.1, block_m=200.0,
                            seed=0):
    """Write ``index.csv`` (path, lat, lon, heading_deg, split) of the geotagged JPEGs.

    Paths are relative to the CSV's folder; ``heading_deg`` is empty when the image has no
    GPSImgDirection. Returns ``(path, rows written, skipped)``.
    """
    import csv
    import io

    from geozoom_ros.errors import InputError

    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f'--val-fraction {val_fraction} must be in [0, 1)')
    if not block_m > 0:
        raise InputError(f'--block-m {block_m} must be a positive number of metres')
    out_csv = Path(out_csv)
    tags, skipped = scan_geotagged(folder)
    splits = [split] * len(tags) if split else block_splits(tags, val_fraction, block_m, seed)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['path', 'lat', 'lon', 'heading_deg', 'split'])
    base = out_csv.resolve().parent
    for tag, s in zip(tags, splits):
        rel = os.path.relpath(tag.path.resolve(), base)
        w.writerow([rel, f'{tag.lat:.8f}', f'{tag.lon:.8f}',
                    '' if tag.heading_deg is None else f'{tag.heading_deg:.2f}', s])
    return atomic_write_text(out_csv, buf.getvalue()), len(tags), skipped


def _dataset_from_images(args):
    path, n, skipped = write_index_from_images(args.folder, args.output, args.split,
                                               args.val_fraction, args.block_m, args.seed)
    _report_skipped(skipped, 'dataset from-images')
    print(f'{path}: {n} geotagged images')
    return 0


def frame_times(tags, order='auto', rate_hz=1.0):
    """Order geotags and give each a time (seconds from the first, strictly increasing).

    ``order`` 'time' sorts by EXIF time (all frames need one; frames sharing a stamp, as
    second-resolution bursts do, are spread evenly until the next stamp), 'name' by file
    name at ``rate_hz``, 'auto' by time when every frame has one. Returns
    ``(ordered tags, times, order used)``.
    """
    from geozoom_ros.errors import InputError

    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise InputError(f'--rate {rate_hz} must be a positive number of Hz')
    have_time = all(t.time_s is not None for t in tags)
    if order == 'time' and not have_time:
        missing = next(t.path for t in tags if t.time_s is None)
        raise InputError(f'--order time: {missing} has no EXIF time; use --order name')
    if order == 'name' or (order == 'auto' and not have_time):
        tags = sorted(tags, key=lambda t: (t.path.name, str(t.path)))
        return tags, [i / rate_hz for i in range(len(tags))], 'name'
    tags = sorted(tags, key=lambda t: (t.time_s, t.path.name, str(t.path)))
    raw = [t.time_s - tags[0].time_s for t in tags]
    times = list(raw)
    i = 0
    while i < len(raw):
        j = i
        while j + 1 < len(raw) and raw[j + 1] == raw[i]:
            j += 1
        if j > i:
            span = (raw[j + 1] - raw[i]) if j + 1 < len(raw) else 1.0
            for k in range(i, j + 1):
                times[k] = raw[i] + (k - i) * span / (j - i + 1)
        i = j + 1
    return tags, times, 'time'


def _load_frame(path, max_width):
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert('RGB')
        if max_width and img.width > max_width:
            h = max(8, int(round(img.height * max_width / img.width)))
            img = img.resize((int(max_width), h), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8).copy()


def write_bag_from_images(folder, out_bag, order='auto', rate_hz=1.0, max_width=1024,
                          fov_deg=None, storage='mcap', write_raw=False, overwrite=False,
                          progress=True):
    """Write a drive bag from the geotagged JPEGs under ``folder``; return ``(path, info)``.

    The frames go to ``/camera/image_raw/compressed`` (and ``/camera/image_raw`` with
    ``write_raw``), their EXIF positions to ``/gps/fix_truth``, in the order of
    :func:`frame_times`; the bag's ENU frame is anchored at the first frame. ``fov_deg`` None
    takes the field of view from EXIF FocalLengthIn35mmFilm (36 mm wide film) when present.
    """
    import numpy as np

    from geozoom_ros.errors import InputError
    from geozoom_ros.geo import LocalFrame
    from geozoom_ros.world.drive import write_drive_bag_from_poses

    if max_width is not None and max_width < 0:
        raise InputError(f'--max-width {max_width} must be >= 0')
    if fov_deg is not None and not 0 < fov_deg < 180:
        raise InputError(f'--fov-deg {fov_deg} must be in (0, 180) degrees')
    if Path(out_bag).exists() and not overwrite:
        raise InputError(f'-o {out_bag} exists; pass --overwrite or choose another path')
    tags, skipped = scan_geotagged(folder)
    tags, times, used = frame_times(tags, order, rate_hz)
    if fov_deg is None and tags[0].focal_35mm:
        fov_deg = math.degrees(2.0 * math.atan(36.0 / (2.0 * tags[0].focal_35mm)))
    frame = LocalFrame(tags[0].lat, tags[0].lon)
    e, n, _ = frame.to_enu(np.array([t.lat for t in tags]), np.array([t.lon for t in tags]),
                           np.zeros(len(tags)))
    enu = np.column_stack([np.atleast_1d(e), np.atleast_1d(n)])

    def frames():
        for t in tags:
            try:
                yield _load_frame(t.path, max_width)
            except (OSError, ValueError) as exc:
                raise InputError(f'{t.path}: cannot decode the image ({type(exc).__name__}); '
                                 'remove or repair it') from None

    alt = next((t.altitude_m for t in tags if t.altitude_m is not None), 0.0)
    path = write_drive_bag_from_poses(
        out_bag, frame, np.asarray(times, dtype=float), enu, frames(), fov_deg=fov_deg,
        storage=storage, write_raw=write_raw, write_compressed=True, altitude_m=alt,
        custom_data={'source': {'images': len(tags), 'order': used,
                                'folder': str(Path(folder).resolve())}},
        progress=progress, overwrite=overwrite)
    return path, {'frames': len(tags), 'order': used, 'duration_s': float(times[-1]),
                  'fov_deg': fov_deg, 'skipped': skipped}


def _bag_from_images(args):
    path, info = write_bag_from_images(args.folder, args.output, args.order, args.rate,
                                       args.max_width, args.fov_deg, args.storage, args.raw,
                                       args.overwrite, not args.no_progress)
    _report_skipped(info['skipped'], 'bag from-images')
    fov = 'none' if info['fov_deg'] is None else f'{info["fov_deg"]:.1f} deg'
    print(f'{path}: {info["frames"]} frames in {info["order"]} order over '
          f'{info["duration_s"]:.1f} s (field of view {fov})')
    return 0
