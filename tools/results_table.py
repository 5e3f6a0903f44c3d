"""Print the README's results table: methods x regimes x worlds, from `geozoom eval --json`.

Usage (after training a model on WORLD's train split):
    python tools/results_table.py --model MODEL --world WORLD [--unseen OTHER_WORLD ...]
        [--retrieval RETRIEVAL_MODEL] [--prior-sigma-m 100] [--limit N] [-o table.md]

For WORLD it evaluates zoom and zoom-beam on test-same (same area, new positions) and
test-cross (blocks with no training view), and zoom-beam with a prior of the given sigma on
test-same; for each unseen world (another seed and style, never used in training) zoom and
zoom-beam on all its views. With ``--retrieval`` the fused search (zoom-fused, with and
without the prior) and the baselines run beside them on the same queries: retrieval
(nearest terminal-cell crop) and ground-only kNN (nearest training-split
ground image of WORLD; for an unseen world that reference set is WORLD's, a different city,
so kNN is at chance there by construction). Bundles are built once per world and model
(`geozoom index`, with the retrieval embeddings when ``--retrieval`` is given).

NEES columns: the search's own covariance and the calibrated one (the model folder's
calibration.json), each over the fixes within 100 m, which is what the calibration targets;
gate AP is the average precision of the published confidence for fixes within 50 m, beside
the share of such fixes (what a gate that knows nothing scores); the calibrated gate column is
the share of queries the threshold fitted on val (calibration.json) publishes and the share of
those within 50 m.
"""

import argparse
import json
from pathlib import Path
import subprocess
import sys


def geozoom(*args):
    """Run a geozoom subcommand and return its stdout (raises on failure)."""
    out = subprocess.run([sys.executable, '-m', 'geozoom_ros.cli', *map(str, args)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f'geozoom {args[0]} failed: {out.stderr.strip().splitlines()[-1]}')
    return out.stdout


def evaluate(bundle, model, data, method, split=None, prior=None, limit=None, train_index=None,
             retrieval=None):
    """Return the JSON summary of one `geozoom eval` run."""
    args = ['eval', '--bundle', bundle, '--model', model, '--data', data, '--method', method,
            '--json', '--no-progress']
    if method == 'zoom-fused':
        args += ['--retrieval-model', retrieval]
    if split:
        args += ['--split', split]
    if prior:
        args += ['--prior-sigma-m', prior]
    if limit:
        args += ['--limit', limit]
    if train_index:
        args += ['--train-index', train_index]
    return json.loads(geozoom(*args))


def _num(v, fmt):
    return '-' if v is None else format(v, fmt)


HEADER = ['| world | regime | method | n | R@25 m % | R@50 m % | R@100 m % | median m | '
          'step acc. % | NEES raw / cal. (<=100 m) | gate AP (base) | cal. gate pub. / prec. % '
          '| ms p50 | chance R@50 % |',
          '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']


def row(world, regime, method, r):
    """Return one markdown table row of an eval summary."""
    pct = [f'{100 * r[f"recall@{d}m"]:.1f}' for d in (25, 50, 100)]
    steps = ' / '.join(f'{100 * a:.0f}' for a in (r.get('step_accuracy') or [])) or '-'
    chance = r.get('chance', {})
    nees = (f'{_num(r.get("nees_raw_mean_within_100m"), ".2f")} / '
            f'{_num(r.get("nees_calibrated_mean_within_100m"), ".2f")}')
    gate = (f'{_num(r.get("gate_average_precision"), ".2f")} '
            f'({_num(r.get("gate_base_rate"), ".2f")})')
    g = r.get('gate_calibrated') or {}
    prec = None if g.get('precision') is None else 100 * g['precision']
    fitted = f'{100 * g["published"]:.1f} / {_num(prec, ".0f")}' if g else '-'
    return (f'| {world} | {regime} | {method} | {r["n"]} | {pct[0]} | {pct[1]} | {pct[2]} | '
            f'{r["median_error_m"]:.0f} | {steps} | {nees} | {gate} | {fitted} | '
            f'{r["latency_ms_p50"]:.0f} | {100 * chance.get("recall@50m", float("nan")):.1f} |')


def main(argv=None):
    """Evaluate and print the table; return 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True, type=Path)
    p.add_argument('--world', required=True, type=Path)
    p.add_argument('--unseen', type=Path, action='append', default=[])
    p.add_argument('--retrieval', type=Path, default=None,
                   help='retrieval model for the retrieval and ground-kNN baselines')
    p.add_argument('--prior-sigma-m', type=float, default=100.0)
    p.add_argument('--limit', type=int, default=None, help='at most N queries per run')
    p.add_argument('-o', '--output', type=Path)
    args = p.parse_args(argv)
    lines = list(HEADER)
    baselines = ('retrieval', 'ground-knn') if args.retrieval else ()
    reference = args.world / 'ground' / 'index.csv'
    worlds = [(args.world, True)] + [(w, False) for w in args.unseen]
    for world, trained in worlds:
        bundle = world / f'bundle-{args.model.name}'
        index = ['index', '--map', world / 'map.mbtiles', '--model', args.model, '-o', bundle]
        if args.retrieval:
            bundle = world / f'bundle-{args.model.name}-{args.retrieval.name}'
            index[-1] = bundle
            index += ['--with-retrieval', args.retrieval]
        geozoom(*index)
        data = world / 'ground' / 'index.csv'
        name = world.name
        runs = []
        methods = ('zoom', 'zoom-beam') + (('zoom-fused',) if args.retrieval else ()) \
            + baselines
        if trained:
            for split, regime in (('test-same', 'same area'), ('test-cross', 'cross-area')):
                for method in methods:
                    runs.append((regime, method, split, None))
            for method in ('zoom-beam', 'zoom-fused') if args.retrieval else ('zoom-beam',):
                runs.append(('same area, prior', f'{method}, prior sigma '
                             f'{args.prior_sigma_m:g} m', 'test-same', args.prior_sigma_m))
        else:
            for method in methods:
                runs.append(('unseen city', method, None, None))
        for regime, method, split, prior in runs:
            base = method.split(',')[0]
            model = args.retrieval if base in baselines else args.model
            r = evaluate(bundle, model, data, base, split, prior, args.limit,
                         reference if base == 'ground-knn' else None, args.retrieval)
            lines.append(row(name, regime, method, r))
            print(lines[-1], flush=True)
    text = '\n'.join(lines) + '\n'
    if args.output:
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
