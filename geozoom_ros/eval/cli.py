"""`geozoom index`, `geozoom eval`, `geozoom calibrate` and `geozoom localize`.

Registration is cheap: torch and the evaluation engine are imported inside the commands.
"""

from datetime import datetime, timezone
import json
import math
from pathlib import Path
import sys

from geozoom_ros.calibration import DEFAULT_GATE_PRECISION, DEFAULT_GATE_WITHIN_M


def register(sub):
    """Add the index, eval, calibrate and localize subcommands."""
    p = sub.add_parser('index', help='encode every map view a model can visit into a bundle',
                       description='Encode every cell view the zoom policy can visit over a map '
                                   'into a map bundle (manifest + memory-mapped float16 '
                                   'tokens). Re-running with the same map and model, or a '
                                   'model with the same map encoder (a decoder distilled '
                                   'from it), reuses the bundle.')
    p.add_argument('--map', required=True, metavar='MAP.mbtiles', help='the tile pyramid')
    p.add_argument('--model', required=True, metavar='MODEL', help='the zoom-policy model folder')
    p.add_argument('-o', '--output', required=True, metavar='BUNDLE', help='bundle directory')
    p.add_argument('--with-retrieval', metavar='RETRIEVAL_MODEL', default=None,
                   help='also store retrieval embeddings of every cell (for the retrieval and '
                        'sim-zoom baselines)')
    p.add_argument('--context-m', type=float, default=None,
                   help='side of the retrieval crops in metres (default: the retrieval '
                        "model's)")
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device', default='cpu', help='torch device (cpu, cuda, auto)')
    p.add_argument('--force', action='store_true', help='rebuild even if the bundle is current')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=_index)

    p = sub.add_parser('eval', help='evaluate a method on an index.csv or a drive bag',
                       description='Localise every query of a data set and print recall within '
                                   '25/50/100 m, error percentiles, NEES, per-step accuracy, '
                                   'latency and chance levels.')
    p.add_argument('--bundle', required=True, metavar='BUNDLE')
    p.add_argument('--model', required=True, metavar='MODEL',
                   help='the zoom policy (zoom, zoom-beam, zoom-fused) or the retrieval model '
                        '(retrieval, sim-zoom, ground-knn)')
    p.add_argument('--data', required=True, metavar='index.csv|drive.mcap')
    p.add_argument('--split', default=None, help='index.csv split (test-same, test-cross, ...)')
    p.add_argument('--method', default='zoom-beam',
                   choices=('zoom', 'zoom-beam', 'zoom-fused', 'retrieval', 'sim-zoom',
                            'ground-knn'))
    p.add_argument('--beam-width', type=int, default=8)
    fusion_args(p)
    p.add_argument('--prior-sigma-m', type=float, default=None,
                   help='give the search a prior drawn around the truth with this sigma (m)')
    p.add_argument('--seed', type=int, default=0, help='seed of the prior draws')
    p.add_argument('--no-heading', dest='use_heading', action='store_false',
                   help="ignore the queries' camera headings (as a robot without a compass): "
                        'heading models run heading-free, heading-aligned retrieval uses '
                        'the north-up crops')
    p.add_argument('--residual-cov', action='store_true',
                   help='zoom methods: count the probability outside the hypotheses in the '
                        'covariance')
    p.add_argument('--limit', type=int, default=None, help='evaluate at most N queries')
    p.add_argument('--train-index', default=None, metavar='index.csv',
                   help='ground-knn: the table whose train split is the reference set '
                        '(default: --data)')
    p.add_argument('--image-topic', default=None, help='bag image topic (default: auto)')
    p.add_argument('--gt-topic', default='/gps/fix_truth', help='bag ground-truth NavSatFix')
    p.add_argument('--backend', default='auto', help='auto, torch, onnxruntime, tensorrt')
    p.add_argument('--device', default='cpu')
    _calibration_args(p)
    p.add_argument('--report', '--plots', dest='report', default=None, metavar='DIR',
                   help='also write summary.json, summary.md and the gate precision/recall '
                        'plot gate_pr.png into DIR')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=_eval)

    p = sub.add_parser('calibrate', help='fit the covariance calibration of a model',
                       description='Localise every query of a validation split, fit the '
                                   'covariance calibration cov = a * search_cov + (b0^2 + '
                                   'b1^2 (1 - confidence)) I by maximum likelihood of the '
                                   'east/north errors (scaled so that the fixes within '
                                   '--nees-within-m have mean NEES 2) and the method\'s '
                                   'confidence gate (the lowest confidence whose fixes lie '
                                   'within --gate-within-m at --gate-precision), and write both '
                                   'to calibration.json beside the model (other methods\' '
                                   'entries are kept). Prints the parameters, the NEES before '
                                   'and after, and the gate.')
    p.add_argument('--bundle', required=True, metavar='BUNDLE')
    p.add_argument('--model', required=True, metavar='MODEL')
    p.add_argument('--data', required=True, metavar='index.csv|drive.mcap')
    p.add_argument('--split', default='val', help='index.csv split to fit on (default: val)')
    p.add_argument('--method', default='zoom-beam', choices=('zoom', 'zoom-beam', 'zoom-fused'))
    p.add_argument('--beam-width', type=int, default=8)
    fusion_args(p)
    p.add_argument('--residual-cov', action='store_true',
                   help='calibrate the covariance that counts the probability outside the '
                        'hypotheses (use the same flag when localising)')
    p.add_argument('--single-gaussian', action='store_true',
                   help='fit one Gaussian to every error instead of a Gaussian for the fixes '
                        'near the truth plus a broad one for far misses')
    p.add_argument('--nees-within-m', type=float, default=100.0,
                   help='scale the fitted covariance so that the fixes within this many metres '
                        'of the truth have mean NEES 2 on the split (0: the maximum-likelihood '
                        'fit as is; default 100)')
    p.add_argument('--gate-precision', type=float, default=DEFAULT_GATE_PRECISION,
                   help='share of published fixes that must lie within --gate-within-m '
                        f'(default {DEFAULT_GATE_PRECISION:g})')
    p.add_argument('--gate-within-m', type=float, default=DEFAULT_GATE_WITHIN_M,
                   help='distance a good fix lies within, metres (default '
                        f'{DEFAULT_GATE_WITHIN_M:g})')
    p.add_argument('--limit', type=int, default=None, help='use at most N queries')
    p.add_argument('-o', '--output', default=None, metavar='calibration.json',
                   help='where to write (default: MODEL/calibration.json)')
    p.add_argument('--image-topic', default=None, help='bag image topic (default: auto)')
    p.add_argument('--gt-topic', default='/gps/fix_truth', help='bag ground-truth NavSatFix')
    p.add_argument('--backend', default='auto', help='auto, torch, onnxruntime, tensorrt')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=_calibrate)

    p = sub.add_parser('localize', help='localise images and print lat, lon, covariance')
    p.add_argument('--bundle', required=True, metavar='BUNDLE')
    p.add_argument('--model', required=True, metavar='MODEL')
    p.add_argument('images', nargs='+', metavar='IMAGE')
    p.add_argument('--heading', type=float, default=None, help='camera heading (deg from N)')
    p.add_argument('--method', default='zoom-beam', choices=('zoom', 'zoom-beam', 'zoom-fused'))
    p.add_argument('--beam-width', type=int, default=8)
    fusion_args(p)
    p.add_argument('--residual-cov', action='store_true',
                   help='count the probability outside the hypotheses in the covariance')
    p.add_argument('--prior', default=None, metavar='LAT,LON,SIGMA_M',
                   help='restrict the search around a position (sigma in metres)')
    _calibration_args(p)
    p.add_argument('--backend', default='auto')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', action='store_true', help='print one JSON object per image')
    p.set_defaults(func=_localize)


def fusion_args(p):
    """Add --retrieval-model and --zoom-weight (method zoom-fused) to a parser."""
    from geozoom_ros.search import DEFAULT_ZOOM_WEIGHT

    p.add_argument('--retrieval-model', default=None, metavar='RETRIEVAL_MODEL',
                   help='zoom-fused: the retrieval model whose embeddings the bundle holds '
                        '(geozoom index ... --with-retrieval)')
    p.add_argument('--zoom-weight', type=float, default=DEFAULT_ZOOM_WEIGHT,
                   help='zoom-fused: weight of the decoder\'s logits against the retrieval '
                        f'evidence (0: retrieval alone; default {DEFAULT_ZOOM_WEIGHT})')


def check_fusion(args):
    """Raise InputError unless the zoom-fused arguments are consistent."""
    from geozoom_ros.errors import InputError

    if not math.isfinite(args.zoom_weight) or args.zoom_weight < 0:
        raise InputError(f'--zoom-weight {args.zoom_weight} must be a finite number >= 0')
    if args.method == 'zoom-fused' and not args.retrieval_model:
        raise InputError('--method zoom-fused needs --retrieval-model RETRIEVAL_MODEL (the '
                         'retrieval model whose embeddings the bundle holds)')


def _calibration_args(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument('--calibration', default='auto', metavar='calibration.json',
                   help='covariance calibration to apply (default: MODEL/calibration.json '
                        'when present)')
    g.add_argument('--no-calibration', dest='calibration', action='store_const', const=None,
                   help="publish the search's own covariance")


def _positive(name, value, allow_none=True):
    from geozoom_ros.errors import InputError

    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise InputError(f'{name} {value} must be a positive number')


def _index(args):
    from geozoom_ros.bundle import build_bundle, load_bundle

    _positive('--batch-size', args.batch_size)
    _positive('--context-m', args.context_m)
    out = build_bundle(args.map, args.model, args.output, batch_size=args.batch_size,
                       progress=not args.no_progress, retrieval_model=args.with_retrieval,
                       device=args.device, overwrite=args.force, context_m=args.context_m)
    b = load_bundle(out)
    m = b.manifest
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f'bundle {out}: {len(b.roots)} root(s) at zoom {b.root_zoom}, '
          f'{m["num_tokens"]} tokens x {b.embed_dim}, levels '
          f'{"/".join(str(c) for c in m["cells_per_level"])} cells, model '
          f'{b.model_hash[:8]}, {size / 1e6:.1f} MB'
          + (f', match keys x {b.keys.shape[1]}' if b.keys is not None else '')
          + (', with retrieval embeddings' if b.retrieval is not None else ''))
    return 0


def _eval(args):
    from geozoom_ros.errors import InputError
    from geozoom_ros.eval.evaluate import (calibration_for, EvalOptions, read_queries,
                                           run_queries, summarize_run)

    _positive('--beam-width', args.beam_width, allow_none=False)
    _positive('--prior-sigma-m', args.prior_sigma_m)
    _positive('--limit', args.limit)
    check_fusion(args)
    knn_index = args.train_index
    if args.method == 'ground-knn' and knn_index is None:
        if not str(args.data).endswith('.csv'):
            raise InputError('ground-knn needs a table with a train split: pass --train-index '
                             'index.csv')
        knn_index = args.data
    queries, skipped = read_queries(args.data, args.split, args.limit, args.image_topic,
                                    args.gt_topic)
    if skipped:
        print(f'geozoom eval: skipped {skipped} row(s) with a missing image or an invalid '
              'position', file=sys.stderr)
    opts = EvalOptions(method=args.method, beam_width=args.beam_width,
                       prior_sigma_m=args.prior_sigma_m, seed=args.seed, backend=args.backend,
                       device=args.device, knn_index=knn_index,
                       retrieval_model=args.retrieval_model, zoom_weight=args.zoom_weight,
                       use_heading=args.use_heading, residual_cov=args.residual_cov,
                       progress=not args.no_progress and not args.json,
                       calibration=args.calibration)
    calibration = calibration_for(args.model, opts)
    run = run_queries(args.bundle, args.model, queries, opts)
    summary = summarize_run(run, opts, skipped, calibration)
    summary['split'] = args.split
    summary['data'] = str(args.data)
    if args.report:
        from geozoom_ros.eval.report import write_eval_report

        write_eval_report(summary, run.confidence, run.errors_m(), args.report)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
        return 0
    _print_summary(summary)
    return 0


def _fmt(v, unit='', pct=False, digits=1):
    if v is None:
        return '-'
    return f'{100 * v:.1f}%' if pct else f'{v:.{digits}f}{unit}'


def _print_summary(s):
    ch = s['chance']
    print(f'method {s["method"]}: {s["n"]} queries ({s["fixes"]} fixes)')
    for d in ('25', '50', '100'):
        key = f'recall@{d}m'
        print(f'  recall within {d:>3} m: {_fmt(s[key], pct=True):>7}   '
              f'(chance {_fmt(ch[key], pct=True)})')
    print(f'  median error {_fmt(s["median_error_m"], " m")}, p90 {_fmt(s["p90_error_m"], " m")}')
    if s.get('nees_mean') is not None:
        print(f'  NEES mean {s["nees_mean"]:.2f} (2 = consistent), within 100 m '
              f'{_fmt(s.get("nees_mean_within_100m"), digits=2)}'
              + ('' if s.get('calibration') is None else
                 f'; uncalibrated {_fmt(s.get("nees_raw_mean"), digits=2)}, within 100 m '
                 f'{_fmt(s.get("nees_raw_mean_within_100m"), digits=2)}'))
    if 'gate_average_precision' in s:
        print(f'  confidence gate: average precision {_fmt(s["gate_average_precision"], digits=3)}'
              f' for fixes within {s["gate_distance_m"]:g} m (a gate without information: '
              f'{_fmt(s["gate_base_rate"], digits=3)})')
    g = s.get('gate_calibrated')
    if g:
        print(f'  calibrated gate (confidence >= {g["min_confidence"]:.3f}): publishes '
              f'{_fmt(g["published"], pct=True)} of queries, {_fmt(g["precision"], pct=True)} '
              f'of them within {s["gate_distance_m"]:g} m')
    if s.get('step_accuracy'):
        acc = ', '.join(_fmt(a, pct=True) for a in s['step_accuracy'])
        print(f'  step accuracy given the true path: {acc}   '
              f'(chance {_fmt(ch["step_accuracy"][0], pct=True)})')
    print(f'  latency p50 {_fmt(s["latency_ms_p50"], " ms")}, '
          f'p95 {_fmt(s["latency_ms_p95"], " ms")}')


def _parse_prior(text):
    from geozoom_ros.errors import InputError

    try:
        lat, lon, sigma = (float(v) for v in text.split(','))
    except ValueError:
        raise InputError(f'--prior {text!r} must be LAT,LON,SIGMA_M (degrees, degrees, '
                         'metres)') from None
    return lat, lon, sigma


def _localize(args):
    import cv2

    from geozoom_ros.errors import InputError
    from geozoom_ros.localizer import GeoZoomLocalizer

    check_fusion(args)
    prior = _parse_prior(args.prior) if args.prior else None
    loc = GeoZoomLocalizer(args.bundle, args.model, backend=args.backend,
                           beam_width=args.beam_width, method=args.method,
                           residual_cov=args.residual_cov, calibration=args.calibration,
                           retrieval_model=args.retrieval_model, zoom_weight=args.zoom_weight,
                           device=args.device)
    for path in args.images:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f'image {path} is missing or not a readable image file')
        fix = loc.localize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), heading_deg=args.heading,
                           prior=prior)
        if fix is None:
            if args.json:
                print(json.dumps({'image': path, 'fix': None}))
            else:
                print(f'{path}: no fix')
            continue
        c = fix.cov_en
        if args.json:
            print(json.dumps({'image': path, 'lat': fix.lat, 'lon': fix.lon,
                              'cov_en_m2': c.tolist(), 'confidence': fix.confidence,
                              'cell': list(fix.cell), 'latency_ms': fix.latency_ms}))
        else:
            print(f'{path}: lat {fix.lat:.7f} lon {fix.lon:.7f}  cov_en [m^2] '
                  f'[[{c[0, 0]:.1f}, {c[0, 1]:.1f}], [{c[1, 0]:.1f}, {c[1, 1]:.1f}]]  '
                  f'sigma {fix.sigma_m:.1f} m  confidence {fix.confidence:.3f}  '
                  f'({fix.latency_ms["total"]:.0f} ms)')
    return 0


def _calibrate(args):
    from geozoom_ros import calibration as C
    from geozoom_ros.errors import InputError
    from geozoom_ros.eval.evaluate import EvalOptions, read_queries, run_queries

    _positive('--beam-width', args.beam_width, allow_none=False)
    _positive('--limit', args.limit)
    check_fusion(args)
    if not 0.0 < args.gate_precision <= 1.0:
        raise InputError(f'--gate-precision {args.gate_precision} must be in (0, 1]')
    if not args.nees_within_m >= 0:
        raise InputError(f'--nees-within-m {args.nees_within_m} must be >= 0 (metres; 0 = off)')
    if not args.gate_within_m > 0:
        raise InputError(f'--gate-within-m {args.gate_within_m} must be positive (metres)')
    out = Path(args.output) if args.output else C.calibration_path(args.model)
    if out.is_dir():
        raise InputError(f'-o {out} is a folder; pass the calibration.json file to write')
    queries, skipped = read_queries(args.data, args.split, args.limit, args.image_topic,
                                    args.gt_topic)
    if skipped:
        print(f'geozoom calibrate: skipped {skipped} row(s) with a missing image or an '
              'invalid position', file=sys.stderr)
    opts = EvalOptions(method=args.method, beam_width=args.beam_width, backend=args.backend,
                       device=args.device, residual_cov=args.residual_cov, calibration=None,
                       retrieval_model=args.retrieval_model, zoom_weight=args.zoom_weight,
                       step_accuracy=False, progress=not args.no_progress and not args.json)
    run = run_queries(args.bundle, args.model, queries, opts)
    err_en = run.errors_en()
    model = C.fit(err_en, run.cov_en, run.confidence, outliers=not args.single_gaussian)
    scale = 1.0
    if args.nees_within_m > 0:
        model, scale = C.rescale_to_nees(model, err_en, run.cov_en, run.confidence,
                                         args.nees_within_m)
    before = C.nees_summary(err_en, run.cov_en)
    after = C.nees_summary(err_en, model.apply(run.cov_en, run.confidence))
    gate = C.fit_gate(run.errors_m(), run.confidence, args.gate_precision,
                      args.gate_within_m)
    info = {'data': str(args.data), 'split': args.split, 'n': before['n'],
            'beam_width': args.beam_width if args.method != 'zoom' else None,
            'zoom_weight': args.zoom_weight if args.method == 'zoom-fused' else None,
            'retrieval_model_sha256': run.extra.get('retrieval_model_sha256'),
            'residual_cov': bool(args.residual_cov),
            'family': 'single-gaussian' if args.single_gaussian else 'gaussian+outliers',
            'nees_within_m': args.nees_within_m or None, 'nees_scale': scale,
            'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
            'nees_raw': before, 'nees_calibrated': after}
    cal = _existing(out, run.model_sha256)
    cal.models[args.method] = model
    cal.info[args.method] = info
    cal.gates[args.method] = gate
    C.save(cal, out)
    if args.json:
        from geozoom_ros.eval.metrics import json_ready

        res = {'path': str(out), 'method': args.method, 'model_sha256': run.model_sha256,
               'parameters': model.to_dict(), 'gate': gate, **info}
        print(json.dumps(json_ready(res), allow_nan=False))
        return 0
    print(f'calibration {out} ({args.method}, model {run.model_sha256[:8]}, {before["n"]} '
          f'fixes of {args.split or args.data}):')
    print(f'  cov = {model.a:.4g} * search_cov + ({model.b0_m:.2f}^2 + {model.b1_m:.2f}^2 '
          '* (1 - confidence)) * I   [m^2]')
    if scale != 1.0:
        print(f'  scaled by {scale:.3g} so that fixes within {args.nees_within_m:g} m have '
              'NEES 2')
    if model.outlier_sigma_m is not None:
        print(f'  far misses: {100 * model.outlier_share:.1f}% of fixes, spread '
              f'{model.outlier_sigma_m:.0f} m per axis (not in the published covariance)')
    for name, d in (('before', before), ('after', after)):
        print(f'  NEES {name:6s}: mean {_fmt(d["nees_mean"], digits=2)}, within 100 m '
              f'{_fmt(d["nees_mean_within_100m"], digits=2)} ({d["n_within_100m"]} fixes; '
              '2 = consistent)')
    if gate['min_confidence'] is None:
        print(f'  gate: no confidence keeps {gate["min_fixes"]}+ fixes within '
              f'{gate["within_m"]:g} m at precision {gate["target_precision"]:g} (best '
              f'{_fmt(gate["best_precision"], digits=2)}); the node uses its min_confidence')
    else:
        print(f'  gate: confidence >= {gate["min_confidence"]:.3f} publishes '
              f'{100 * gate["published_share"]:.1f}% of queries, {100 * gate["precision"]:.1f}% '
              f'of them within {gate["within_m"]:g} m')
    return 0


def _existing(path, model_sha256):
    """Return the calibration at ``path`` to extend, or a new one for this model."""
    from geozoom_ros import calibration as C
    from geozoom_ros.errors import GeoZoomError

    if Path(path).is_file():
        try:
            cal = C.load(path)
        except GeoZoomError as exc:
            print(f'geozoom calibrate: replacing {path}: {exc}', file=sys.stderr)
        else:
            if cal.model_sha256 == model_sha256:
                return cal
            print(f'geozoom calibrate: replacing {path}: it was fitted for model '
                  f'{str(cal.model_sha256)[:8]}', file=sys.stderr)
    return C.Calibration({}, model_sha256, {})
