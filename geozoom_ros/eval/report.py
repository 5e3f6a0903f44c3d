"""The eval-bag report: plots, ``metrics.json`` and ``report.md`` in one folder.

Figures (matplotlib, Agg backend, PNG):

- ``error_cdf.png``: the share of frames localised within a distance, for the fixes (all
  frames, and the published ones) and for the trajectories (fused, odometry alone), with the
  25/50/100 m marks;
- ``error_time.png``: error over time (fixes as dots, published / gated out / rejected by the
  EKF gate; the fused and odometry-only trajectories as lines) above the confidence and the
  1-sigma radius of every fix;
- ``trajectory_map.png``: the drive over the map (the tile pyramid or orthophoto): ground
  truth, fixes coloured by their error, gated-out and EKF-rejected fixes marked, fused and
  odometry-only trajectories, in East-North metres about the datum;
- ``latency.png``: per-frame latency histogram (decode + encoder + search) with p50/p95.

Every file is written under a temporary name in the report folder and renamed into place.
"""

import json
import math
from pathlib import Path

import numpy as np

from geozoom_ros.eval.metrics import json_ready, RECALL_DISTANCES_M
from geozoom_ros.fileio import atomic_write, atomic_write_text

FIGURES = ('error_cdf.png', 'error_time.png', 'trajectory_map.png', 'latency.png')
_C = {'truth': '#111111', 'fused': '#1f77b4', 'odom': '#ff7f0e', 'dr': '#9467bd',
      'pub': '#2ca02c', 'gated': '#8c8c8c', 'rejected': '#d62728'}


def _save(fig, path):
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.rcParams.update({'font.size': 10, 'axes.grid': True, 'grid.alpha': 0.3})
    return plt


# --------------------------------------------------------------------------------------------
# Map background

def map_background(map_path, lat, lon, side_m, size=1024):
    """Return a north-up RGB crop ``side_m`` metres square centred on (lat, lon), or None.

    ``map_path``: an MBTiles file or XYZ folder (rendered with the tile views) or a GeoTIFF
    (reprojected with rasterio). None when the path is missing or unreadable.
    """
    if map_path is None or not Path(map_path).exists():
        return None
    p = Path(map_path)
    try:
        if p.suffix.lower() in ('.tif', '.tiff'):
            return _geotiff_crop(p, lat, lon, side_m, size)
        from geozoom_ros.tiles.store import open_store
        from geozoom_ros.tiles.views import render_crop

        store = open_store(p)
        try:
            view = render_crop(store, lat, lon, side_m, size, fill=(235, 235, 235))
            return np.asarray(getattr(view, 'image', view))
        finally:
            close = getattr(store, 'close', None)
            if close:
                close()
    except Exception:  # noqa: B902 - a background is optional: plot without one
        return None


def _geotiff_crop(path, lat, lon, side_m, size):
    import mercantile
    import rasterio
    from rasterio.transform import Affine
    from rasterio.warp import reproject, Resampling

    scale = 1.0 / math.cos(math.radians(lat))  # Web-Mercator metres per ground metre
    mx, my = mercantile.xy(lon, lat)
    half = 0.5 * side_m * scale
    dst = np.full((3, size, size), 235, np.uint8)
    res = 2.0 * half / size
    transform = Affine(res, 0.0, mx - half, 0.0, -res, my + half)
    with rasterio.open(path) as src:
        for b in range(min(3, src.count)):
            reproject(rasterio.band(src, b + 1), dst[b], dst_transform=transform,
                      dst_crs='EPSG:3857', resampling=Resampling.average)
        if src.count < 3:
            dst[1:] = dst[0]
    return np.moveaxis(dst, 0, -1)


# --------------------------------------------------------------------------------------------
# Figures

def _plain_log_ticks(axis):
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator([v * 10.0 ** k for k in range(-1, 6)
                                         for v in (1, 2, 5)]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    axis.set_minor_formatter(NullFormatter())


def _cdf_xy(errors):
    e = np.asarray(errors, dtype=float)
    e = e[~np.isnan(e)]
    n = len(e)
    if n == 0:
        return None
    fin = np.sort(e[np.isfinite(e)])
    y = np.arange(1, len(fin) + 1) / n * 100.0
    return fin, y


def plot_error_cdf(ev, path):
    """Write the error CDF (share of frames within a distance; 25/50/100 m marks)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    curves = []
    known = np.isfinite(ev.true_lat)
    if known.any():
        err = np.where(np.isnan(ev.error_m), np.inf, ev.error_m)[known]
        curves.append(('fixes, all frames', err, _C['pub'], '-'))
        gated = np.array([f.gated_in for f in ev.frames], bool)[known]
        if gated.any() and not gated.all():
            curves.append(('published fixes only', err[gated], _C['pub'], ':'))
    for key, label, colour, style in (('fused', 'fused trajectory (EKF)', _C['fused'], '-'),
                                      ('odometry_only', 'odometry alone', _C['odom'], '-'),
                                      ('ekf_without_fixes', 'EKF without fixes', _C['dr'], '--')):
        if key in ev.errors and len(ev.errors[key].error):
            curves.append((label, ev.errors[key].error, colour, style))
    xmax = 10.0
    for label, e, colour, style in curves:
        xy = _cdf_xy(e)
        if xy is None or not len(xy[0]):
            continue
        x, y = xy
        x = np.maximum(x, 0.1)
        ax.step(np.concatenate([[0.1], x]), np.concatenate([[0.0], y]), where='post',
                color=colour, ls=style, lw=2.0,
                label=f'{label} (median {np.median(e):.0f} m)' if np.isfinite(np.median(e))
                else label)
        xmax = max(xmax, float(x.max()))
    for d in RECALL_DISTANCES_M:
        ax.axvline(d, color='k', lw=0.8, ls='--', alpha=0.6)
        ax.text(d, 101, f'{d:g} m', ha='center', va='bottom', fontsize=9)
    ax.set_xscale('log')
    ax.set_xlim(1.0, max(200.0, xmax * 1.3))
    _plain_log_ticks(ax.xaxis)
    ax.set_ylim(0, 100)
    ax.set_xlabel('position error (m, log scale)')
    ax.set_ylabel('frames within the error (%)')
    ax.set_title('Error CDF: share of frames localised within a distance', pad=18)
    if curves:
        ax.legend(loc='best', fontsize=9, framealpha=0.9)
    else:
        ax.text(0.5, 0.5, 'no ground truth: no errors to show', transform=ax.transAxes,
                ha='center', va='center')
    fig.tight_layout()
    return _save(fig, path)


def plot_error_time(ev, path):
    """Write error over time (top) and confidence / 1-sigma over time (bottom)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                  gridspec_kw={'height_ratios': [3, 2]})
    t = np.array([f.t for f in ev.frames], dtype=float)
    gated = np.array([f.gated_in for f in ev.frames], bool)
    has_fix = np.array([f.status == 'fix' for f in ev.frames], bool)
    rejected = np.zeros(len(t), bool) if ev.ekf_accepted is None else \
        (ev.ekf_tested & ~ev.ekf_accepted)
    err = ev.error_m
    ok = np.isfinite(err)
    floor = 0.5
    if ok.any():
        e = np.maximum(err, floor)
        sel = ok & gated & ~rejected
        ax.scatter(t[sel], e[sel], s=14, color=_C['pub'], label='published fix', zorder=3)
        sel = ok & has_fix & ~gated
        if sel.any():
            ax.scatter(t[sel], e[sel], s=22, marker='x', color=_C['gated'],
                       label='gated out by the node (NO_FIX)', zorder=3)
        sel = ok & rejected
        if sel.any():
            ax.scatter(t[sel], e[sel], s=40, facecolors='none', edgecolors=_C['rejected'],
                       lw=1.5, label='rejected by the EKF gate', zorder=4)
    for key, label, colour, style in (('fused', 'fused trajectory', _C['fused'], '-'),
                                      ('odometry_only', 'odometry alone', _C['odom'], '-'),
                                      ('ekf_without_fixes', 'EKF without fixes', _C['dr'], '--')):
        if key in ev.errors and len(ev.errors[key].t):
            te = ev.errors[key]
            ax.plot(te.t, np.maximum(te.error, floor), color=colour, ls=style, lw=2.0,
                    label=f'{label} (final {te.final_error_m:.1f} m)')
    for d in RECALL_DISTANCES_M:
        ax.axhline(d, color='k', lw=0.7, ls=':', alpha=0.6)
    ax.set_yscale('log')
    _plain_log_ticks(ax.yaxis)
    ax.set_ylabel('error (m, log scale)')
    if ok.any() or ev.errors:
        ax.legend(loc='lower left', bbox_to_anchor=(0.0, 1.01, 1.0, 0.2), mode='expand',
                  fontsize=8.5, ncol=3, borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, 'no ground truth: no errors to show', transform=ax.transAxes,
                ha='center', va='center')
    conf = np.array([f.confidence for f in ev.frames], dtype=float)
    sig = np.array([f.sigma_m for f in ev.frames], dtype=float)
    ax2.scatter(t[gated], conf[gated], s=10, color=_C['pub'], label='confidence (published)')
    ax2.scatter(t[has_fix & ~gated], conf[has_fix & ~gated], s=16, marker='x',
                color=_C['gated'], label='confidence (gated out)')
    threshold = ev.gate.threshold((ev.metrics.get('options') or {}).get('method'))
    ax2.axhline(threshold, color=_C['pub'], ls='--', lw=1.0,
                label=f'gate confidence {threshold:g}')
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel('confidence')
    ax2.set_xlabel('time since the start of the bag (s)')
    ax3 = ax2.twinx()
    ax3.plot(t[has_fix], sig[has_fix], color='#555555', lw=1.0, alpha=0.8,
             label='1-sigma radius')
    ax3.set_ylabel('1-sigma radius (m)')
    ax3.ticklabel_format(axis='y', useOffset=False, style='plain')
    sig_f = sig[has_fix & np.isfinite(sig)]
    ax3.set_ylim(0, max(1.0, float(sig_f.max()) * 1.1) if sig_f.size else 1.0)
    ax3.grid(False)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc='lower left', bbox_to_anchor=(0.0, 1.01, 1.0, 0.2),
               mode='expand', fontsize=8, ncol=4, borderaxespad=0.0)
    fig.tight_layout()
    return _save(fig, path)


def plot_trajectory_map(ev, path, map_path=None, size=1024):
    """Write the trajectories and fixes over the map (East/North metres about the datum)."""
    plt = _pyplot()
    from matplotlib.colors import Normalize

    pts = []
    if ev.truth is not None:
        pts.append(ev.truth[1])
    for tr in (ev.fused, ev.dead_reckoning):
        if tr is not None:
            pts.append(tr.xy)
    if ev.odom_only is not None:
        pts.append(ev.odom_only[1])
    fixes = ev.fix_enu[np.all(np.isfinite(ev.fix_enu), axis=1)]
    track = np.concatenate(pts) if pts else np.zeros((0, 2))
    track = track[np.all(np.isfinite(track), axis=1)]
    # Frame the drive; wild fixes far off it are shown at the border, not allowed to zoom out
    # the whole picture.
    base = track if len(track) else fixes
    if len(base) == 0:
        base = np.zeros((1, 2))
    lo, hi = base.min(axis=0), base.max(axis=0)
    reach = max(0.35 * float(np.max(hi - lo)), 100.0)
    near = fixes[np.all((fixes > lo - reach) & (fixes < hi + reach), axis=1)]
    if len(near):
        lo, hi = np.minimum(lo, near.min(axis=0)), np.maximum(hi, near.max(axis=0))
    centre = 0.5 * (lo + hi)
    side = max(float(np.max(hi - lo)) * 1.12, 100.0)
    fig, ax = plt.subplots(figsize=(9.5, 9))
    lat_c, lon_c, _ = ev.bag.frame.to_latlon(centre[0], centre[1], 0.0)
    bg = map_background(map_path, float(lat_c), float(lon_c), side, size)
    extent = (centre[0] - side / 2, centre[0] + side / 2, centre[1] - side / 2,
              centre[1] + side / 2)
    if bg is not None:
        # Washed out towards white so that the lines and markers stay readable over it.
        faded = (0.55 * bg.astype(np.float32) + 0.45 * 255).astype(np.uint8)
        ax.imshow(faded, extent=extent, origin='upper', zorder=0)
    half = side / 2

    def clip(xy):
        return np.clip(xy, centre - half, centre + half)

    gated = np.array([f.gated_in for f in ev.frames], bool)
    fin = np.all(np.isfinite(ev.fix_enu), axis=1)
    rejected = np.zeros(len(gated), bool) if ev.ekf_accepted is None else \
        (ev.ekf_tested & ~ev.ekf_accepted)
    if ev.truth is not None:
        ax.plot(*ev.truth[1].T, color=_C['truth'], lw=2.5, label='ground truth', zorder=2)
        ax.plot(*ev.truth[1][0], marker='o', ms=10, color=_C['truth'], zorder=6)
        ax.annotate('start', ev.truth[1][0], xytext=(8, -16), textcoords='offset points',
                    fontsize=10, weight='bold', zorder=7,
                    bbox={'facecolor': 'white', 'alpha': 0.8, 'edgecolor': 'none', 'pad': 1})
    if ev.odom_only is not None:
        ax.plot(*clip(ev.odom_only[1]).T, color=_C['odom'], lw=2.0, label='odometry alone',
                zorder=3)
    if ev.dead_reckoning is not None:
        ax.plot(*clip(ev.dead_reckoning.xy).T, color=_C['dr'], lw=1.3, ls='--',
                label='EKF without fixes', zorder=3)
    if ev.fused is not None:
        ax.plot(*clip(ev.fused.xy).T, color=_C['fused'], lw=2.2, label='fused (EKF)', zorder=4)
    sel = fin & gated
    if sel.any():
        err = ev.error_m[sel]
        colour = np.where(np.isfinite(err), err, 0.0)
        vmax = 100.0
        sc = ax.scatter(*clip(ev.fix_enu[sel]).T, c=np.minimum(colour, vmax), cmap='RdYlGn_r',
                        norm=Normalize(0, vmax), s=26, edgecolors='k', linewidths=0.4,
                        zorder=5, label='published fix (colour = error)')
        cb = fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.02)
        cb.set_label('fix error (m; 100 = 100 or more)')
    sel = fin & ~gated
    if sel.any():
        ax.scatter(*clip(ev.fix_enu[sel]).T, marker='x', s=30, color=_C['gated'], zorder=5,
                   label='gated out by the node')
    sel = fin & rejected
    if sel.any():
        ax.scatter(*clip(ev.fix_enu[sel]).T, s=90, facecolors='none',
                   edgecolors=_C['rejected'], lw=1.8, zorder=6,
                   label='rejected by the EKF gate')
    outside = fin & np.any(np.abs(ev.fix_enu - centre) > half, axis=1)
    if outside.any():
        ax.text(0.99, 0.01, f'{int(outside.sum())} fixes outside this frame are drawn at its '
                'edge', transform=ax.transAxes, ha='right', va='bottom', fontsize=8.5,
                bbox={'facecolor': 'white', 'alpha': 0.85, 'edgecolor': 'none'}, zorder=7)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect('equal')
    ax.set_xlabel('east of the datum (m)')
    ax.set_ylabel('north of the datum (m)')
    title = 'Drive over the map' if bg is not None else 'Drive (no map background available)'
    ax.set_title(title)
    ax.legend(loc='upper left', fontsize=8.5, framealpha=0.9)
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(ev, path):
    """Write the per-frame latency histogram with its p50 and p95."""
    plt = _pyplot()
    lat = np.array([f.latency_ms for f in ev.frames], dtype=float)
    lat = lat[np.isfinite(lat)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if lat.size:
        hi = float(np.percentile(lat, 99.5)) * 1.1
        ax.hist(np.minimum(lat, hi), bins=min(60, max(10, lat.size // 4)), range=(0, hi),
                color='#4c72b0', edgecolor='white')
        for q, ls in ((50, '-'), (95, '--')):
            v = float(np.percentile(lat, q))
            ax.axvline(v, color='#d62728', ls=ls, lw=1.5, label=f'p{q} {v:.1f} ms')
        ax.legend()
    else:
        ax.text(0.5, 0.5, 'no frame was localised', transform=ax.transAxes, ha='center')
    ax.set_xlabel('latency per frame (ms): decode + encoder + search')
    ax.set_ylabel('frames')
    ax.set_title(f'Latency ({lat.size} frames)')
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Report

def _f(v, unit='', digits=1, pct=False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return 'n/a'
    if pct:
        return f'{100.0 * v:.1f} %'
    return f'{v:.{digits}f}{(" " + unit) if unit else ""}'


def summary_rows(metrics):
    """Return ``[(name, value text)]``: the headline figures of a metrics dict."""
    rows = []
    fr = metrics.get('frames') or {}
    rows.append(('frames evaluated', str(fr.get('evaluated', 'n/a'))))
    rows.append(('published fixes (node gate)', str(fr.get('published', 'n/a'))))
    fx = metrics.get('fixes')
    if fx:
        for d in RECALL_DISTANCES_M:
            rows.append((f'fixes within {d:g} m', _f(fx.get(f'recall@{d:g}m'), pct=True)))
        rows.append(('median fix error', _f(fx.get('median_error_m'), 'm')))
        rows.append(('mean NEES (2 = consistent)', _f(fx.get('nees_mean'), digits=2)))
    fu = metrics.get('fusion')
    if fu:
        rows.append(('fixes rejected by the EKF gate',
                     f'{fu["fixes_rejected_by_gate"]} of {fu["fixes_offered"]}'))
        for key, name in (('fused', 'fused'), ('odometry_only', 'odometry alone'),
                          ('ekf_without_fixes', 'EKF without fixes')):
            if fu.get(key):
                e = fu[key]
                rows.append((f'{name}: ATE RMSE / final / max',
                             f'{_f(e["ate_rmse_m"])} / {_f(e["final_error_m"])} / '
                             f'{_f(e["max_error_m"])} m'))
        if fu.get('final_error_ratio_odometry_over_fused') is not None:
            rows.append(('final error, odometry alone / fused',
                         _f(fu['final_error_ratio_odometry_over_fused'], digits=1) + ' x'))
    lat = metrics.get('latency_ms') or {}
    if lat.get('p50') is not None:  # fixes recorded from a node carry no latency of their own
        rows.append(('latency p50 / p95', f'{_f(lat.get("p50"))} / {_f(lat.get("p95"))} ms'))
    return rows


def _markdown(metrics, figures):
    bag = metrics.get('bag', {})
    lines = ['# geozoom eval-bag report', '',
             f'- bag: `{bag.get("path")}`',
             f'- image topic: `{bag.get("image_topic")}` ({bag.get("image_type")}, '
             f'{bag.get("images")} messages)',
             f'- ground truth: `{bag.get("gt_topic") or "none"}`; odometry: '
             f'`{bag.get("odom_topic") or "none"}`; IMU: `{bag.get("imu_topic") or "none"}`']
    if metrics.get('model'):
        lines.append(f'- model: `{metrics["model"]}`; bundle: `{metrics.get("bundle")}`')
    if metrics.get('options'):
        opts = metrics['options'].items()
        lines.append('- options: ' + ', '.join(f'{k}={v}' for k, v in opts))
    g = metrics.get('gate') or {}
    fitted = g.get('calibrated_min_confidence') or {}
    conf = ', '.join(f'{v:g} ({k}, calibrated)' for k, v in fitted.items()) \
        if fitted else f'{g.get("min_confidence")}'
    lines.append(f'- node gate: confidence >= {conf}, 1-sigma <= {g.get("max_sigma_m")} m')
    lines += ['', '## Summary', '', '| figure | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in summary_rows(metrics)]
    lines += ['', 'Errors are metres in the local East-North-Up frame about the datum. ATE '
              'RMSE is the root mean square position error of a trajectory at the '
              'ground-truth times, without any fitting: the odometry is aligned once, at the '
              'start, with the true initial pose, as the EKF is initialised. A frame without a '
              'fix counts as a miss. Full figures: [metrics.json](metrics.json).', '']
    captions = {'error_cdf.png': 'Error CDF', 'error_time.png': 'Error and confidence over '
                'time', 'trajectory_map.png': 'Trajectories and fixes over the map',
                'latency.png': 'Latency'}
    for name in figures:
        lines += [f'## {captions.get(name, name)}', '', f'![{captions.get(name, name)}]({name})',
                  '']
    warns = metrics.get('warnings') or []
    if warns:
        lines += ['## Warnings', ''] + [f'- {w}' for w in warns] + ['']
    return '\n'.join(lines)


def write_report(ev, out_dir, map_path=None):
    """Write the figures, ``metrics.json`` and ``report.md``; return the report's path.

    ``ev`` is a :class:`~geozoom_ros.eval.bag.BagEvaluation`; ``out_dir`` is created.

    ``map_path``: the tile pyramid or orthophoto drawn under the trajectories (default: the
    evaluation's ``map_path``, the pyramid the bundle was built from).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    map_path = map_path or ev.map_path
    figures = []
    for name, fn in (('error_cdf.png', plot_error_cdf), ('error_time.png', plot_error_time),
                     ('trajectory_map.png',
                      lambda e, p: plot_trajectory_map(e, p, map_path=map_path)),
                     ('latency.png', plot_latency)):
        fn(ev, out / name)
        figures.append(name)
    metrics = json_ready(ev.metrics)
    metrics['figures'] = figures
    metrics['map_background'] = str(map_path) if map_path else None
    atomic_write_text(out / 'metrics.json', json.dumps(metrics, indent=1) + '\n')
    return atomic_write_text(out / 'report.md', _markdown(metrics, figures))


# --------------------------------------------------------------------------------------------
# The query-set report of `geozoom eval --report DIR`

EVAL_FIGURES = ('gate_pr.png',)


def plot_gate_pr(confidence, errors_m, path, distance_m=50.0, title=None):
    """Write the confidence gate's precision/recall curve for fixes within ``distance_m``.

    Left: precision against recall over every confidence threshold, with the share of right
    fixes (what a gate without information reaches) and the average precision. Right:
    precision, recall and the published share against the threshold.
    """
    from geozoom_ros.eval import metrics as M

    plt = _pyplot()
    conf = np.asarray(confidence, dtype=float)
    e = np.nan_to_num(np.asarray(errors_m, dtype=float), nan=np.inf)
    right = e <= distance_m
    thr, prec, rec = M.precision_recall(conf, right)
    ap = M.average_precision(conf, right)
    base = float(np.mean(right)) if right.size else float('nan')
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.8))
    if thr.size and np.all(np.isfinite(rec)):
        ax.step(np.r_[0.0, rec], np.r_[prec[0], prec], where='pre', color=_C['pub'], lw=2.0,
                label=f'confidence gate (AP {ap:.3f})')
        for q in (0.1, 0.5, 0.9):
            i = min(len(thr) - 1, int(q * (len(thr) - 1)))
            at_right = rec[i] > 0.8  # label to the left of points near the right edge
            ax.annotate(f'c >= {thr[i]:.3g}', (rec[i], prec[i]), textcoords='offset points',
                        xytext=(-6 if at_right else 6, 6), ha='right' if at_right else 'left',
                        fontsize=8)
            ax.plot(rec[i], prec[i], 'o', color=_C['pub'], ms=4)
        ax.axhline(base, color=_C['gated'], ls='--', lw=1.2,
                   label=f'no information ({100 * base:.1f} % right)')
        ax.legend(loc='upper right', fontsize=9, framealpha=0.9)
        order = np.argsort(thr)
        pub = np.array([np.mean(conf >= t) for t in thr[order]])
        ax2.plot(thr[order], prec[order], color=_C['pub'], lw=2.0, label='precision')
        ax2.plot(thr[order], rec[order], color=_C['fused'], lw=2.0, label='recall')
        ax2.plot(thr[order], pub, color=_C['gated'], lw=1.5, ls=':',
                 label='published share of queries')
        ax2.legend(loc='best', fontsize=9, framealpha=0.9)
    else:
        ax.text(0.5, 0.5, f'no fix within {distance_m:g} m: no curve', transform=ax.transAxes,
                ha='center', va='center')
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f'recall (share of the fixes within {distance_m:g} m that pass)')
    ax.set_ylabel(f'precision (passing fixes within {distance_m:g} m)')
    ax.set_title(title or 'Confidence gate: precision / recall')
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel('confidence threshold')
    ax2.set_ylabel('fraction')
    ax2.set_title('Against the threshold')
    fig.tight_layout()
    return _save(fig, path)


def eval_summary_rows(summary):
    """Return ``[(name, value text)]``: the headline figures of a ``geozoom eval`` summary."""
    s = summary
    rows = [('method', str(s.get('method'))), ('queries (fixes)', f'{s.get("n")} '
                                                                  f'({s.get("fixes")})')]
    ch = s.get('chance') or {}
    for d in RECALL_DISTANCES_M:
        rows.append((f'recall within {d:g} m', f'{_f(s.get(f"recall@{d:g}m"), pct=True)} '
                     f'(chance {_f(ch.get(f"recall@{d:g}m"), pct=True)})'))
    rows.append(('median / p90 error', f'{_f(s.get("median_error_m"))} / '
                                       f'{_f(s.get("p90_error_m"))} m'))
    rows.append(('NEES mean, uncalibrated (all / within 100 m)',
                 f'{_f(s.get("nees_raw_mean"), digits=2)} / '
                 f'{_f(s.get("nees_raw_mean_within_100m"), digits=2)}'))
    rows.append(('NEES mean, calibrated (all / within 100 m)',
                 f'{_f(s.get("nees_calibrated_mean"), digits=2)} / '
                 f'{_f(s.get("nees_calibrated_mean_within_100m"), digits=2)}'))
    if 'gate_average_precision' in s:
        rows.append((f'gate average precision (within {s.get("gate_distance_m", 50):g} m)',
                     f'{_f(s.get("gate_average_precision"), digits=3)} (no information: '
                     f'{_f(s.get("gate_base_rate"), digits=3)})'))
    g = s.get('gate_calibrated')
    if g:
        rows.append((f'calibrated gate (confidence >= {g["min_confidence"]:.3f}): published / '
                     'precision', f'{_f(g["published"], pct=True)} / '
                                  f'{_f(g["precision"], pct=True)}'))
    if s.get('step_accuracy'):
        rows.append(('step accuracy given the true path',
                     ' / '.join(_f(a, pct=True) for a in s['step_accuracy'])))
    rows.append(('latency p50 / p95', f'{_f(s.get("latency_ms_p50"))} / '
                                      f'{_f(s.get("latency_ms_p95"))} ms'))
    return rows


def write_eval_report(summary, confidence, errors_m, out_dir):
    """Write ``summary.json``, ``summary.md`` and ``gate_pr.png`` into ``out_dir``.

    ``summary`` is a ``geozoom eval`` summary; ``confidence`` and ``errors_m`` (metres) the
    per-query values the gate curve is drawn from. Returns the markdown file's path.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        from geozoom_ros.errors import InputError
        raise InputError(f'--report {out} is a file; pass a folder')
    out.mkdir(parents=True, exist_ok=True)
    d = summary.get('gate_distance_m') or 50.0
    title = f'Confidence gate, {summary.get("method")}: fixes within {d:g} m'
    plot_gate_pr(confidence, errors_m, out / 'gate_pr.png', distance_m=d, title=title)
    summary = json_ready({**summary, 'figures': list(EVAL_FIGURES)})
    atomic_write_text(out / 'summary.json', json.dumps(summary, indent=1) + '\n')
    cal = summary.get('calibration')
    lines = ['# geozoom eval', '',
             f'- data: `{summary.get("data")}`, split `{summary.get("split")}`',
             '- covariance calibration: ' + (
                 'none' if not cal else
                 f'`{cal.get("path")}` (a {cal["a"]:.4g}, b0 {cal["b0_m"]:.2f} m, b1 '
                 f'{cal["b1_m"]:.2f} m)'),
             '', '| figure | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in eval_summary_rows(summary)]
    lines += ['', 'NEES is the 2-D normalised estimation error squared (2 = consistent). The '
              'gate publishes fixes whose confidence is at least a threshold: precision is the '
              f'share of published fixes within {d:g} m, recall the share of fixes within '
              f'{d:g} m that are published. Full figures: [summary.json](summary.json).', '',
              '## Confidence gate', '', '![Confidence gate precision/recall](gate_pr.png)', '']
    return atomic_write_text(out / 'summary.md', '\n'.join(lines))
