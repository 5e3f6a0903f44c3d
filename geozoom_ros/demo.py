"""`geozoom demo`: the embedded default, end to end, on a fresh machine.

Steps (each writes an artefact and is skipped when the artefact is already there):
1. make the demo world (a small generated city: orthophoto, MBTiles pyramid, ground views,
   drive bag) with `geozoom world make`'s code path;
2. verify the pyramid and render the zoom path of a few ground views: the overhead view of
   every cell the policy visits, from the root down to the terminal cell, beside the ground
   image; and the world's preview sheet;
3. print where everything is.
"""

from pathlib import Path
import time

DEMO_WORLD = dict(seed=7, size_m=1200.0, origin=(47.3769, 8.5417), style='summer')
DEMO_N_GROUND = 400
# A 1.2 km world fits in one zoom-15 cell (about 820 m at 47 N, or a 2x2 block of them);
# three 4x4 steps end at zoom 21 (about 13 m). The policy's own root zoom comes with the model.
DEMO_ROOT_ZOOM = 15
DEMO_STEPS = 3


def register(sub):
    """Add `geozoom demo`."""
    p = sub.add_parser('demo', help='run the embedded default end to end (demo world, views)')
    p.add_argument('-o', '--out', type=Path, default=Path('out/demo'),
                   help='output folder (default: out/demo)')
    p.add_argument('--force', action='store_true', help='rebuild artefacts that exist')
    p.add_argument('--samples', type=int, default=4, help='ground views to show zoom paths for')
    p.set_defaults(func=run)


def _step(msg):
    print(f'[geozoom demo] {msg}', flush=True)


def run(args):
    """Run the demo pipeline; return 0 on success."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    world_dir = make_demo_world(out / 'world', force=args.force)
    _step(f'world ready in {world_dir}')
    sheet = world_dir / 'preview.png'
    if args.force or not sheet.exists():
        from geozoom_ros.world.preview import make_preview
        make_preview(world_dir, sheet)
    _step(f'preview sheet: {sheet}')
    paths = render_zoom_paths(world_dir, out / 'zoom_paths', args.samples)
    for p in paths:
        _step(f'zoom path: {p}')
    _step(f'done in {time.monotonic() - t0:.0f} s; outputs under {out}')
    return 0


def make_demo_world(world_dir, force=False):
    """Make (or reuse) the demo world; return its folder."""
    from geozoom_ros.world.make import make_world
    if not force and (world_dir / 'world.json').exists() and (world_dir / 'map.mbtiles').exists():
        return world_dir
    _step('making the demo world (city, orthophoto, pyramid, ground views, drive bag)')
    return make_world(world_dir, seed=DEMO_WORLD['seed'], size_m=DEMO_WORLD['size_m'],
                      origin=DEMO_WORLD['origin'], style=DEMO_WORLD['style'],
                      n_ground=DEMO_N_GROUND)


def render_zoom_paths(world_dir, out_dir, samples, size=256):
    """Render, for a few test views, the overhead view of every cell on the true zoom path.

    Writes one PNG per sample: the ground image, then the root view and each step's view with
    the chosen sub-cell outlined. Returns the written paths.
    """
    import csv

    import cv2
    import mercantile
    import numpy as np

    from geozoom_ros import geo
    from geozoom_ros.tiles.store import open_store
    from geozoom_ros.tiles.views import render_view

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(world_dir / 'ground' / 'index.csv', newline='') as f:
        rows = [r for r in csv.DictReader(f) if r['split'].startswith('test')]
    rows = rows[:samples]
    written = []
    with open_store(world_dir / 'map.mbtiles', preload=True) as store:
        for i, row in enumerate(rows):
            lat, lon = float(row['lat']), float(row['lon'])
            root = geo.cell_at(lat, lon, DEMO_ROOT_ZOOM)
            actions = geo.path_to(root, lat, lon, DEMO_STEPS)
            panels = []
            ground = cv2.imread(str(world_dir / 'ground' / row['path']))
            ground = cv2.resize(ground, (size * ground.shape[1] // ground.shape[0], size))
            panels.append(ground)
            cell = root
            for step in range(DEMO_STEPS + 1):
                img = cv2.cvtColor(render_view(store, cell, size=size).image, cv2.COLOR_RGB2BGR)
                if step < DEMO_STEPS:
                    r, c = geo.action_to_rowcol(actions[step])
                    s = size // 4
                    cv2.rectangle(img, (c * s, r * s), (c * s + s - 1, r * s + s - 1),
                                  (0, 0, 255), 2)
                else:  # the camera's true position inside the terminal cell
                    left, bottom, right, top = geo.cell_xy_bounds(cell)
                    x, y = mercantile.xy(lon, lat)
                    px = (int((x - left) / (right - left) * size),
                          int((top - y) / (top - bottom) * size))
                    cv2.drawMarker(img, px, (0, 0, 255), cv2.MARKER_CROSS, 14, 2)
                cv2.putText(img, f'z{cell.z}  {geo.cell_size_m(cell):.0f} m', (6, 18),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
                panels.append(img)
                if step < DEMO_STEPS:
                    cell = geo.child(cell, actions[step])
            strip = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0))) for p in panels], axis=1)
            path = out_dir / f'zoom_path_{i}.png'
            tmp = path.with_suffix('.tmp.png')
            cv2.imwrite(str(tmp), strip)
            tmp.replace(path)
            written.append(path)
    return written
