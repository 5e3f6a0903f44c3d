"""`geozoom bench node`: geozoom_node under a 1920x1080, 30 Hz camera stream.

A publisher node, the localization node and a listener share one process (in-process delivery,
so what is measured is the node, not the middleware's handling of 6 MB frames between
processes). The camera publishes ``rgb8`` frames stamped with the current time at ``--hz`` for
``--seconds``; the node localises the newest frame as fast as it can (``max_rate_hz`` set above
the camera rate, so the output rate is the processing capacity). Reported: input and output
rates, the processing capacity measured on the same frames offline, stamp-to-publish latency
(p50/p95/max, listener receive time minus the image stamp), resident memory after warm-up and
its growth to the end, and the node's queue (the one-slot newest-frame buffer: never more than
one frame waits; the rest are dropped and counted).

Without ``--bundle``/``--model`` a small synthetic map and an untrained policy of the default
architecture (EfficientNet-Lite0 at 768x384 pixels, 4x4 grid) are built in a temporary folder:
the per-frame cost is the real one whether or not the weights are trained.
"""

import json
import os
from pathlib import Path
import tempfile
import threading
import time


def register(bench_sub):
    """Add `geozoom bench node`."""
    p = bench_sub.add_parser('node', help='geozoom_node under a 1920x1080 30 Hz stream: '
                                          'output rate, latency, memory, queue')
    p.add_argument('--seconds', type=float, default=60.0,
                   help='length of the stream in seconds (default 60)')
    p.add_argument('--hz', type=float, default=30.0, help='camera rate in Hz (default 30)')
    p.add_argument('--width', type=int, default=1920, help='frame width, pixels (1920)')
    p.add_argument('--height', type=int, default=1080, help='frame height, pixels (1080)')
    p.add_argument('--warmup', type=float, default=None, metavar='S',
                   help='seconds excluded from the memory baseline (default: 20%% of the run, '
                        'at least 5 s)')
    p.add_argument('--bundle', default=None, help='map bundle (default: a synthetic one)')
    p.add_argument('--model', default=None, help='model of the bundle (with --bundle)')
    p.add_argument('--backend', default='auto', help='inference backend (auto)')
    p.add_argument('--json', action='store_true', help='print the figures as JSON')
    p.set_defaults(func=run)


def make_small_world(folder, size_m=400.0, gsd_m=0.5, lat=47.37, lon=8.54, root_zoom=16,
                     grid_k=2, steps=2, embed_dim=16, ground_size=(32, 32), view_size=32,
                     encoder_layers=None, seed=0, progress=False):
    """Build a real small map: GeoTIFF -> MBTiles -> untrained policy -> map bundle.

    Returns a dict of paths (``ortho``, ``map``, ``model``, ``bundle``) and the map's
    ``bounds`` (west, south, east, north degrees). Sizes: ``size_m`` metres at ``gsd_m`` m/px;
    the policy zooms ``steps`` times through a ``grid_k`` x ``grid_k`` grid from
    ``root_zoom``. Used by the node's tests and this benchmark.
    """
    import torch

    from geozoom_ros.bundle import build_bundle, load_bundle
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.policy import ZoomPolicy
    from geozoom_ros.tiles.bench import synthetic_ortho
    from geozoom_ros.tiles.build import build_mbtiles

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ortho = folder / 'ortho.tif'
    synthetic_ortho(ortho, size_m=size_m, gsd_m=gsd_m, lat=lat, lon=lon, seed=seed)
    mbtiles = build_mbtiles(ortho, folder / 'map.mbtiles', workers=1, progress=progress)
    torch.manual_seed(seed)
    heads = 2 if embed_dim < 64 else 8
    cfg = PolicyConfig(embed_dim=embed_dim, grid_k=grid_k, steps=steps, root_zoom=root_zoom,
                       view_size=view_size, ground_size=tuple(ground_size),
                       decoder_layers=encoder_layers or 1, decoder_heads=heads, dropout=0.0)
    model = save_model(ZoomPolicy(cfg, pretrained=False).eval(), folder / 'model')
    bundle = build_bundle(mbtiles, model, folder / 'bundle', batch_size=16, progress=progress)
    return {'ortho': ortho, 'map': mbtiles, 'model': model, 'bundle': bundle,
            'bounds': load_bundle(bundle).bounds}


def rss_bytes():
    """Return this process's resident set size in bytes (Linux /proc)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _frame_msgs(width, height, count=8, seed=0):
    """Return ``count`` distinct rgb8 ``sensor_msgs/Image`` messages (smooth noise)."""
    import cv2
    import numpy as np
    from sensor_msgs.msg import Image

    rng = np.random.default_rng(seed)
    msgs = []
    for _ in range(count):
        small = rng.integers(0, 256, (27, 48, 3), dtype=np.uint8)
        rgb = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        msgs.append(Image(height=height, width=width, encoding='rgb8', step=width * 3,
                          data=rgb.tobytes()))
    return msgs


def run_bench(bundle, model, seconds=60.0, hz=30.0, width=1920, height=1080, warmup_s=None,
              backend='auto', progress=True):
    """Run the benchmark; return a dict of measured figures (see the module docstring)."""
    import numpy as np
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import NavSatFix
    from tqdm import tqdm

    from geozoom_ros.errors import InputError
    from geozoom_ros.localizer import GeoZoomLocalizer
    from geozoom_ros.ros.conversions import image_msg_to_rgb
    from geozoom_ros.ros.node import GeoZoomNode, stamp_ns
    from geozoom_ros.ros.params import NodeParams

    if not (seconds > 0 and hz > 0 and width >= 8 and height >= 8):
        raise InputError('--seconds, --hz must be positive and the frame at least 8x8 pixels')
    warmup_s = max(5.0, 0.2 * seconds) if warmup_s is None else float(warmup_s)
    if warmup_s >= seconds:
        raise InputError(f'--warmup {warmup_s} s must be shorter than --seconds {seconds}')
    loc = GeoZoomLocalizer(bundle, model, backend=backend)
    frames = _frame_msgs(width, height)
    for m in frames[:2]:  # warm the backend up before the stream starts
        loc.localize(image_msg_to_rgb(m))

    context = Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    topic = '/bench/camera/image_raw'
    params = NodeParams(bundle=str(bundle), model=str(model), backend=backend,
                        image_topic=topic, fix_topic='/bench/fix', pose_topic='',
                        hypotheses_topic='', diagnostics_topic='/bench/diagnostics',
                        max_rate_hz=1000.0, min_confidence=0.0, max_sigma_m=1e9)
    node = cam = listener = None
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    received = []
    lock = threading.Lock()
    try:
        node = GeoZoomNode(params, localizer=loc, context=context)
        cam = rclpy.create_node('geozoom_bench_camera', context=context)
        listener = rclpy.create_node('geozoom_bench_listener', context=context)
        pub = cam.create_publisher(type(frames[0]), topic, 5)

        def on_fix(msg):
            now = time.time_ns()
            with lock:
                received.append((time.monotonic(), now - stamp_ns(msg.header.stamp)))

        listener.create_subscription(NavSatFix, '/bench/fix', on_fix,
                                     QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
        for n in (node, cam, listener):
            executor.add_node(n)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        samples = []  # (t since start, rss, frames received, processed, dropped, pending)
        published = 0
        start = time.monotonic()
        period = 1.0 / hz
        next_sample = start
        bar = tqdm(total=int(seconds), desc='bench node', unit='s', disable=not progress)
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            msg = frames[published % len(frames)]
            ns = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(ns, 1_000_000_000)
            pub.publish(msg)
            published += 1
            if now >= next_sample:
                s = node.stats
                samples.append((now - start, rss_bytes(), s['frames_received'],
                                s['frames_processed'], s['frames_dropped'],
                                node._slot.pending()))
                if len(samples) > 1:
                    bar.update(1)
                next_sample += 1.0
            delay = start + published * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        bar.close()
        # Let the frame in progress finish; then nothing may be left waiting.
        time.sleep(max(1.0, 3.0 * (time.monotonic() - start) / max(1, node.stats[
            'frames_processed'])))
        s = node.stats
        samples.append((time.monotonic() - start, rss_bytes(), s['frames_received'],
                        s['frames_processed'], s['frames_dropped'], node._slot.pending()))
        stats = dict(node.stats)
    finally:
        executor.shutdown(timeout_sec=2.0)
        for n in (listener, cam, node):
            if n is not None:
                n.destroy_node()
        rclpy.try_shutdown(context=context)

    # Processing capacity on the same frames without ROS (decode + localise), warm, on a
    # thread like the node's worker: on a loaded machine torch's thread pool runs much slower
    # from the main thread, which would understate the capacity.
    timing = []

    def offline():
        t0 = time.perf_counter()
        for m in frames:
            loc.localize(image_msg_to_rgb(m))
        timing.append((time.perf_counter() - t0) / len(frames) * 1e3)

    worker = threading.Thread(target=offline)
    worker.start()
    worker.join()
    offline_ms = timing[0]
    with lock:
        got = list(received)
    t_fix = np.array([t for t, _ in got]) - start
    lat = np.array([v for _, v in got]) / 1e6
    steady = t_fix >= warmup_s
    out_rate = steady.sum() / (seconds - warmup_s) if steady.any() else 0.0
    base = [s for s in samples if s[0] >= warmup_s]
    rss0, rss1 = (base[0][1], samples[-1][1]) if base else (samples[0][1], samples[-1][1])
    # received - processed - dropped: the frame waiting in the slot plus the one in progress.
    backlog = [s[2] - s[3] - s[4] for s in samples]
    return {
        'frame': f'{width}x{height} rgb8', 'seconds': seconds, 'camera_hz': hz,
        'warmup_s': warmup_s, 'backend': getattr(loc.backend, 'name', '?'),
        'frames_published': published,
        'input_rate_hz': published / seconds,
        'frames_received': stats['frames_received'],
        'frames_processed': stats['frames_processed'],
        'frames_dropped': stats['frames_dropped'],
        'fixes_received': len(got),
        'output_rate_hz': float(out_rate),
        'offline_ms_per_frame': offline_ms,
        'offline_capacity_hz': 1e3 / offline_ms,
        'latency_ms_p50': float(np.percentile(lat[steady], 50)) if steady.any() else None,
        'latency_ms_p95': float(np.percentile(lat[steady], 95)) if steady.any() else None,
        'latency_ms_max': float(lat[steady].max()) if steady.any() else None,
        'rss_mb_after_warmup': rss0 / 2**20,
        'rss_mb_end': rss1 / 2**20,
        'rss_growth_pct': (rss1 - rss0) / rss0 * 100.0,
        'queue_max_pending': max(s[5] for s in samples),
        'queue_end_pending': samples[-1][5],
        'backlog_max_frames': max(backlog),
        'backlog_end_frames': backlog[-1],
    }


def run(args):
    """Run `geozoom bench node` and print the figures."""
    from geozoom_ros.errors import InputError

    if (args.bundle is None) != (args.model is None):
        raise InputError('give both --bundle and --model, or neither (a synthetic map)')
    with tempfile.TemporaryDirectory(prefix='geozoom-bench-node-') as tmp:
        if args.bundle is None:
            print('building a synthetic map and an untrained default-size policy ...',
                  flush=True)
            world = make_small_world(Path(tmp), size_m=1000.0, root_zoom=14, grid_k=4,
                                     steps=2, embed_dim=256, ground_size=(768, 384),
                                     view_size=384, encoder_layers=6, progress=True)
            bundle, model = world['bundle'], world['model']
        else:
            bundle, model = args.bundle, args.model
        r = run_bench(bundle, model, seconds=args.seconds, hz=args.hz, width=args.width,
                      height=args.height, warmup_s=args.warmup, backend=args.backend)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f'geozoom bench node: {r["frame"]} at {r["camera_hz"]:g} Hz for {r["seconds"]:g} s '
          f'({r["backend"]} backend, warm-up {r["warmup_s"]:g} s)')
    print(f'  camera: {r["frames_published"]} frames published ({r["input_rate_hz"]:.1f} Hz), '
          f'{r["frames_received"]} received by the node')
    print(f'  node: {r["frames_processed"]} processed, {r["frames_dropped"]} dropped (newest '
          f'frame wins), {r["fixes_received"]} fixes received')
    print(f'  output rate after warm-up: {r["output_rate_hz"]:.2f} Hz; processing capacity '
          f'offline: {r["offline_capacity_hz"]:.2f} Hz ({r["offline_ms_per_frame"]:.1f} ms '
          'per frame)')
    if r['latency_ms_p95'] is not None:
        print(f'  stamp-to-publish latency: p50 {r["latency_ms_p50"]:.1f} ms, p95 '
              f'{r["latency_ms_p95"]:.1f} ms, max {r["latency_ms_max"]:.1f} ms')
    print(f'  resident memory: {r["rss_mb_after_warmup"]:.1f} MB after warm-up, '
          f'{r["rss_mb_end"]:.1f} MB at the end ({r["rss_growth_pct"]:+.2f}%)')
    print(f'  queue: at most {r["queue_max_pending"]} frame waiting ({r["queue_end_pending"]} '
          f'after the stream); backlog (received - processed - dropped: waiting + in '
          f'progress) max {r["backlog_max_frames"]}, after the stream '
          f'{r["backlog_end_frames"]}')
    return 0
