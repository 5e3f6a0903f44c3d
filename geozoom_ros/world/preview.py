"""`geozoom world preview`: a contact sheet of a world for people to look at.

Left: the whole orthophoto with the test-cross blocks (red), every camera of the sheet as a
numbered wedge (its horizontal field of view, 60 m long). Right: one row per camera with a
north-up orthophoto crop around it (150 m, wedge drawn) beside the ground view it took.
"""

import json
import os
from pathlib import Path

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.geo import destination, latlon_to_utm

_COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 220, 120), (255, 100, 220),
            (0, 230, 230), (255, 140, 0), (180, 120, 255), (160, 255, 60), (255, 255, 255)]
_SPLIT_COLOURS = {'train': (255, 255, 255), 'val': (0, 200, 255), 'test-same': (255, 210, 0),
                  'test-cross': (255, 70, 70)}


def _load(world_dir):
    world_dir = Path(world_dir)
    info_path = world_dir / 'world.json'
    if not info_path.is_file():
        raise InputError(f'{info_path} does not exist; give a folder written by '
                         '`geozoom world make`')
    info = json.loads(info_path.read_text())
    index = world_dir / 'ground' / 'index.csv'
    ortho = world_dir / 'ortho.tif'
    for p in (index, ortho):
        if not p.is_file():
            raise InputError(f'{p} is missing; re-run `geozoom world make` for {world_dir}')
    return world_dir, info, index, ortho


def _pick(rows, n, split):
    if split:
        rows = [r for r in rows if r['split'] == split]
        if not rows:
            raise InputError(f'no ground views of split {split!r} in this world')
    rng = np.random.default_rng(0)
    by_split = {}
    for r in rows:
        by_split.setdefault(r['split'], []).append(r)
    picked = []
    names = list(by_split)
    k = 0
    while len(picked) < min(n, len(rows)):
        pool = by_split[names[k % len(names)]]
        if pool:
            picked.append(pool.pop(int(rng.integers(len(pool)))))
        k += 1
        if all(not p for p in by_split.values()):
            break
    return picked


def make_preview(world_dir, out_path, n=8, split=None, overview_px=None, row_px=220):
    """Write the contact sheet PNG of a world folder; return its path.

    ``overview_px``: side of the orthophoto overview in pixels (default: as tall as the rows).
    """
    import rasterio
    from PIL import Image, ImageDraw

    from geozoom_ros.world.dataset import read_index
    world_dir, info, index, ortho = _load(world_dir)
    rows = read_index(index)
    if not rows:
        raise InputError(f'{index} lists no ground views; make the world with --n-ground > 0')
    views = _pick(rows, int(n), split)
    if overview_px is None:
        overview_px = max(600, len(views) * (row_px + 8))
    with rasterio.open(ortho) as src:
        epsg = src.crs.to_epsg()
        scale = max(src.width, src.height) / overview_px
        ow, oh = int(round(src.width / scale)), int(round(src.height / scale))
        data = src.read(out_shape=(3, oh, ow),
                        resampling=rasterio.enums.Resampling.average)
        inv = ~src.transform
        full = src

        def to_px(lat, lon, s=1.0):
            e, nn, _ = latlon_to_utm(lat, lon, epsg)
            c, r = inv @ (e, nn)
            return c / s, r / s

        overview = Image.fromarray(np.moveaxis(data, 0, -1))
        draw = ImageDraw.Draw(overview)
        frame = info['frame']
        from geozoom_ros.geo import LocalFrame
        lf = LocalFrame(frame['lat0'], frame['lon0'])
        for box in info['splits']['cross_blocks_enu']:
            x0, y0, x1, y1 = box
            lat, lon, _ = lf.to_latlon(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]),
                                       np.zeros(4))
            pts = [to_px(a, b, scale) for a, b in zip(lat, lon)]
            draw.polygon(pts, outline=(255, 60, 60))
        crops = []
        half_m = 75.0
        res = full.res[0]
        for k, v in enumerate(views):
            col = _COLOURS[k % len(_COLOURS)]
            _wedge(draw, to_px, v, 60.0, scale, col, str(k + 1))
            e, nn, _ = latlon_to_utm(v['lat'], v['lon'], epsg)
            c, r = inv @ (e, nn)
            rad = int(round(half_m / res))
            window = rasterio.windows.Window(int(c) - rad, int(r) - rad, 2 * rad, 2 * rad)
            crop = full.read(window=window, boundless=True, fill_value=0)
            crop_img = Image.fromarray(np.moveaxis(crop, 0, -1))
            crop_img = crop_img.resize((row_px, row_px), Image.LANCZOS)
            cd = ImageDraw.Draw(crop_img)
            s = 2 * rad / row_px

            def crop_px(lat, lon, c0=int(c) - rad, r0=int(r) - rad, s=s):
                ee, nnn, _ = latlon_to_utm(lat, lon, epsg)
                cc, rr = inv @ (ee, nnn)
                return (cc - c0) / s, (rr - r0) / s
            _wedge(cd, lambda a, b, _s=1.0: crop_px(a, b), v, 55.0, 1.0, col, None, width=2)
            crops.append(crop_img)
    ground = []
    for v in views:
        img = Image.open(world_dir / 'ground' / v['path']).convert('RGB')
        w = int(round(img.width * row_px / img.height))
        ground.append(img.resize((min(w, 3 * row_px), row_px), Image.LANCZOS))
    gw = max(g.width for g in ground)
    right_w = row_px + 8 + gw
    rows_h = len(views) * (row_px + 8)
    sheet_h = max(oh, rows_h) + 30
    sheet = Image.new('RGB', (ow + 16 + right_w, sheet_h), (24, 24, 28))
    sheet.paste(overview, (0, 30))
    d = ImageDraw.Draw(sheet)
    d.text((6, 8), f"seed {info['seed']}  {info['size_m']:.0f} m  {info['style']}  "
                   f"{info.get('preset', 'street')}  (red: test-cross blocks)",
           fill=(230, 230, 230))
    x0 = ow + 16
    for k, (v, crop, g) in enumerate(zip(views, crops, ground)):
        y = 30 + k * (row_px + 8)
        sheet.paste(crop, (x0, y))
        sheet.paste(g, (x0 + row_px + 8, y))
        col = _COLOURS[k % len(_COLOURS)]
        d.rectangle([x0, y, x0 + row_px - 1, y + row_px - 1], outline=col, width=2)
        d.text((x0 + row_px + 14, y + 4),
               f"{k + 1}  {v['split']}  hdg {v['heading_deg']:.0f}  fov {v['fov_deg']:.0f}",
               fill=_SPLIT_COLOURS.get(v['split'], (255, 255, 255)))
    out_path = Path(out_path)
    tmp = out_path.with_name(f'.{out_path.name}.{os.getpid()}.tmp.png')
    try:
        sheet.save(tmp)
        os.replace(tmp, out_path)
    except OSError as exc:
        raise InputError(f'cannot write {out_path}: {exc.strerror or exc}') from None
    return out_path


def _wedge(draw, to_px, v, length_m, scale, colour, label, width=1):
    lat, lon = v['lat'], v['lon']
    fov = min(float(v['fov_deg']), 350.0)
    h = float(v['heading_deg'])
    pts = [to_px(lat, lon, scale)]
    for a in np.linspace(h - fov / 2, h + fov / 2, 9):
        la, lo = destination(lat, lon, a, length_m)
        pts.append(to_px(la, lo, scale))
    draw.polygon(pts, outline=colour, width=width)
    cx, cy = pts[0]
    draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
    if label:
        draw.text((cx + 4, cy + 2), label, fill=colour)
