"""`geozoom demo`: the embedded default, end to end, on a fresh machine.

Steps (each writes an artefact and is skipped when the artefact is already there):
1. make the demo world (a generated city: orthophoto, MBTiles pyramid, ground views, a 2 km
   drive bag) through `geozoom world make`'s code path;
2. index the map with the shipped model and the shipped retrieval model (`geozoom index
   --with-retrieval`): every cell view encoded once;
3. draw the world's preview sheet and, for a few test views, the true zoom path;
4. play the drive bag through the real geozoom_node over rclpy (`geozoom replay` feeding the
   node in its own process; the fused search, method zoom-fused, by default) and record the
   fixes it publishes;
5. score those fixes against the bag's ground truth, replay the EKF fusion of odometry, IMU
   and fixes, write the report, and print the metrics table and the report's path.
"""

from pathlib import Path
import time

DEMO_WORLD = dict(seed=7, size_m=1200.0, origin=(47.3769, 8.5417), style='summer')
DEMO_N_GROUND = 400
#: The shipped model, trained on the demo world (see config/train/ and README).
SHIPPED_MODEL = Path(__file__).resolve().parent / 'assets' / 'model'
#: The shipped retrieval model of the fused search, trained on the demo city and two others.
SHIPPED_RETRIEVAL = Path(__file__).resolve().parent / 'assets' / 'retrieval'
#: Replay speed of the drive: the node keeps the newest frame, so a faster replay only means
#: fewer frames localised.
DEMO_RATE = 2.0


def register(sub):
    """Add `geozoom demo`."""
    p = sub.add_parser('demo', help='run the embedded default end to end (demo world, views)')
    p.add_argument('-o', '--out', type=Path, default=Path('out/demo'),
                   help='output folder (default: out/demo)')
    p.add_argument('--force', action='store_true', help='rebuild artefacts that exist')
    p.add_argument('--samples', type=int, default=4, help='ground views to show zoom paths for')
    p.add_argument('--model', type=Path, default=SHIPPED_MODEL,
                   help='model folder (default: the shipped model)')
    p.add_argument('--method', default='zoom-fused', choices=('zoom-fused', 'zoom-beam'),
                   help='the node\'s search (default zoom-fused: the zoom steps weighed by the '
                        'retrieval model)')
    p.add_argument('--retrieval-model', type=Path, default=SHIPPED_RETRIEVAL,
                   help='retrieval model of the fused search (default: the shipped one)')
    p.add_argument('--rate', type=float, default=DEMO_RATE,
                   help=f'replay speed of the drive (default {DEMO_RATE:g}x)')
    p.set_defaults(func=run)


def _step(msg):
    print(f'[geozoom demo] {msg}', flush=True)


def run(args):
    """Run the demo pipeline; return 0 on success."""
    from geozoom_ros.errors import InputError

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (args.model / 'config.json').exists():
        raise InputError(f'model {args.model} has no config.json; pass --model MODEL_DIR')
    fused = args.method == 'zoom-fused'
    if fused and not (args.retrieval_model / 'config.json').exists():
        raise InputError(f'retrieval model {args.retrieval_model} has no config.json; pass '
                         '--retrieval-model MODEL_DIR or --method zoom-beam')
    retrieval = args.retrieval_model if fused else None
    t0 = time.monotonic()
    world_dir = make_demo_world(out / 'world', force=args.force)
    _step(f'world ready in {world_dir} ({time.monotonic() - t0:.0f} s)')
    bundle = index_demo_map(world_dir, args.model, out / 'bundle', force=args.force,
                            retrieval_model=retrieval)
    _step(f'map bundle ready in {bundle} ({time.monotonic() - t0:.0f} s)')
    sheet = world_dir / 'preview.png'
    if args.force or not sheet.exists():
        from geozoom_ros.world.preview import make_preview
        make_preview(world_dir, sheet)
    _step(f'preview sheet: {sheet}')
    for p in render_zoom_paths(world_dir, out / 'zoom_paths', args.samples, args.model):
        _step(f'zoom path: {p}')
    node = dict(method='zoom-fused', retrieval_model=str(retrieval)) if fused else {}
    report, _ = run_drive(world_dir / 'drive.mcap', world_dir / 'map.mbtiles', bundle,
                          args.model, out / 'drive', args.rate, **node)
    _step(f'done in {time.monotonic() - t0:.0f} s; report: {report}')
    return 0


def index_demo_map(world_dir, model, bundle_dir, force=False, retrieval_model=None):
    """Encode every cell view of the demo map with ``model`` (reused when current).

    With ``retrieval_model``, also its embeddings of every cell's crop (the fused search's).
    """
    from geozoom_ros.bundle import build_bundle
    _step('indexing the map: every cell view the policy can visit, encoded once'
          + (', with the retrieval crops' if retrieval_model else ''))
    return build_bundle(world_dir / 'map.mbtiles', model, bundle_dir, overwrite=force,
                        retrieval_model=retrieval_model)


def demo_node_params(bundle, model, **overrides):
    """Return the node parameters of the demo: compressed camera, IMU heading, reliable QoS."""
    from geozoom_ros.world import drive as D
    params = dict(bundle=str(bundle), model=str(model),
                  image_topic=D.TOPIC_IMAGE_COMPRESSED, image_transport='compressed',
                  image_qos='reliable', heading_source='imu', heading_topic=D.TOPIC_IMU,
                  max_rate_hz=5.0)
    params.update(overrides)
    return params


def run_drive(drive, map_path, bundle, model, out_dir, rate, **node_params):
    """Play a drive bag through the node, score it and write the report.

    ``node_params`` override the demo's node parameters. Prints the metrics table; returns
    ``(report path, BagEvaluation)``.
    """
    from geozoom_ros.calibration import resolve
    from geozoom_ros.eval import bag as B
    from geozoom_ros.eval.report import summary_rows, write_report
    from geozoom_ros.ros.live import run_node_on_bag
    from geozoom_ros.ros.params import NodeParams

    params = demo_node_params(bundle, model, **node_params)
    _step(f'playing the drive {drive} through geozoom_node over rclpy')
    fixes, diag = run_node_on_bag(drive, params, out_dir / 'node', rate=rate, progress=_step)
    _step(f'node published {len(fixes)} fixes; diagnostics: '
          f'{diag.get("frames_received", "?")} frames received, '
          f'{diag.get("frames_processed", "?")} processed, '
          f'{diag.get("frames_dropped", "?")} dropped (newest frame wins)')
    bag = B.read_bag(drive, quiet=True)
    frames = [B.frame_fix_from_navsatfix(m, bag, index=i) for i, m in enumerate(fixes)]
    # The report states the gate the node applied (its parameters and the model's calibration).
    p = NodeParams(**params)
    gate = B.Gate.from_params(p).use_calibration(resolve(p.calibration, p.model))
    ev = B.evaluate(bag, frames, gate, info={'model': str(model), 'bundle': str(bundle),
                                             'source': 'geozoom_node over rclpy', 'rate': rate,
                                             'options': {'method': p.method}})
    report = write_report(ev, out_dir / 'report', map_path=map_path)
    rows = summary_rows(ev.metrics)
    # The bag's images keep their recorded stamps, so stamp-to-publish lag means nothing here.
    rows.append(('node processing latency mean / p95',
                 f'{diag.get("processing_latency_ms_mean", "n/a")} / '
                 f'{diag.get("processing_latency_ms_p95", "n/a")} ms'))
    width = max(len(k) for k, _ in rows)
    print('\n'.join(f'  {k:<{width}}  {v}' for k, v in rows), flush=True)
    return report, ev


def make_demo_world(world_dir, force=False):
    """Make (or reuse) the demo world; return its folder."""
    from geozoom_ros.world.make import make_world
    if not force and (world_dir / 'world.json').exists() and (world_dir / 'map.mbtiles').exists():
        return world_dir
    _step('making the demo world (city, orthophoto, pyramid, ground views, drive bag)')
    return make_world(world_dir, seed=DEMO_WORLD['seed'], size_m=DEMO_WORLD['size_m'],
                      origin=DEMO_WORLD['origin'], style=DEMO_WORLD['style'],
                      n_ground=DEMO_N_GROUND)


def render_zoom_paths(world_dir, out_dir, samples, model, size=256):
    """Render, for a few test views, the overhead view of every cell on the true zoom path.

    The cell tree (root zoom, steps, grid) is the model's. Writes one PNG per sample: the
    ground image, then the root view and each step's view with the chosen sub-cell outlined,
    and the terminal cell with the camera's true position. Returns the written paths.
    """
    import csv
    import json

    import cv2
    import mercantile
    import numpy as np

    from geozoom_ros import geo
    from geozoom_ros.tiles.store import open_store
    from geozoom_ros.tiles.views import render_view

    cfg = json.loads((Path(model) / 'config.json').read_text())['config']
    root_zoom, steps, k = int(cfg['root_zoom']), int(cfg['steps']), int(cfg['grid_k'])
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(world_dir / 'ground' / 'index.csv', newline='') as f:
        rows = [r for r in csv.DictReader(f) if r['split'].startswith('test')]
    rows = rows[:samples]
    written = []
    with open_store(world_dir / 'map.mbtiles', preload=True) as store:
        for i, row in enumerate(rows):
            lat, lon = float(row['lat']), float(row['lon'])
            root = geo.cell_at(lat, lon, root_zoom)
            actions = geo.path_to(root, lat, lon, steps, k)
            panels = []
            ground = cv2.imread(str(world_dir / 'ground' / row['path']))
            ground = cv2.resize(ground, (size * ground.shape[1] // ground.shape[0], size))
            panels.append(ground)
            cell = root
            for step in range(steps + 1):
                img = cv2.cvtColor(render_view(store, cell, size=size).image, cv2.COLOR_RGB2BGR)
                if step < steps:
                    r, c = geo.action_to_rowcol(actions[step], k)
                    s = size // k
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
                if step < steps:
                    cell = geo.child(cell, actions[step], k)
            strip = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0))) for p in panels], axis=1)
            path = out_dir / f'zoom_path_{i}.png'
            tmp = path.with_suffix('.tmp.png')
            cv2.imwrite(str(tmp), strip)
            tmp.replace(path)
            written.append(path)
    return written
