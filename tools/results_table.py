"""Print the README's results table: methods x regimes x worlds, from `geozoom eval --json`.

Usage (after training a model on WORLD's train split):
    python tools/results_table.py --model MODEL --world WORLD [--unseen OTHER_WORLD ...]
        [--prior-sigma-m 100] [-o table.md]

For WORLD it evaluates zoom and zoom-beam on test-same (same area, new positions) and
test-cross (blocks with no training view), and zoom-beam with a prior of the given sigma on
test-same; for each unseen world (another seed and style, never used in training) zoom and
zoom-beam on all its views. Bundles are built once per world and model (`geozoom index`).
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


def evaluate(bundle, model, data, method, split=None, prior=None):
    """Return the JSON summary of one `geozoom eval` run."""
    args = ['eval', '--bundle', bundle, '--model', model, '--data', data, '--method', method,
            '--json', '--no-progress']
    if split:
        args += ['--split', split]
    if prior:
        args += ['--prior-sigma-m', prior]
    return json.loads(geozoom(*args))


def row(world, regime, method, r):
    """Return one markdown table row of an eval summary."""
    pct = [f'{100 * r[f"recall@{d}m"]:.1f}' for d in (25, 50, 100)]
    steps = ' / '.join(f'{100 * a:.0f}' for a in (r.get('step_accuracy') or []))
    chance = r.get('chance', {})
    return (f'| {world} | {regime} | {method} | {r["n"]} | {pct[0]} | {pct[1]} | {pct[2]} | '
            f'{r["median_error_m"]:.0f} | {steps} | {r.get("nees_mean", float("nan")):.1f} | '
            f'{r["latency_ms_p50"]:.0f} | {100 * chance.get("recall@50m", float("nan")):.1f} |')


def main(argv=None):
    """Evaluate and print the table; return 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True, type=Path)
    p.add_argument('--world', required=True, type=Path)
    p.add_argument('--unseen', type=Path, action='append', default=[])
    p.add_argument('--prior-sigma-m', type=float, default=100.0)
    p.add_argument('-o', '--output', type=Path)
    args = p.parse_args(argv)
    lines = ['| world | regime | method | n | R@25 m % | R@50 m % | R@100 m % | median m | '
             'step acc. % | NEES | ms p50 | chance R@50 % |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    worlds = [(args.world, True)] + [(w, False) for w in args.unseen]
    for world, trained in worlds:
        bundle = world / f'bundle-{args.model.name}'
        geozoom('index', '--map', world / 'map.mbtiles', '--model', args.model, '-o', bundle)
        data = world / 'ground' / 'index.csv'
        name = world.name
        runs = []
        if trained:
            for split, regime in (('test-same', 'same area'), ('test-cross', 'cross-area')):
                for method in ('zoom', 'zoom-beam'):
                    runs.append((regime, method, split, None))
            runs.append(('same area, prior', f'zoom-beam, prior sigma '
                         f'{args.prior_sigma_m:g} m', 'test-same', args.prior_sigma_m))
        else:
            for method in ('zoom', 'zoom-beam'):
                runs.append(('unseen city', method, None, None))
        for regime, method, split, prior in runs:
            r = evaluate(bundle, args.model, data, method.split(',')[0], split, prior)
            lines.append(row(name, regime, method, r))
            print(lines[-1], flush=True)
    text = '\n'.join(lines) + '\n'
    if args.output:
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
