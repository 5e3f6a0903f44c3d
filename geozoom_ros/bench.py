"""`geozoom bench <area>`: benchmarks that print measured figures (and JSON with --json).

Each area adds its benchmark as a sub-subcommand through ``register(bench_subparsers)`` in its
own ``bench`` module; timings are reported as ratios measured in one run where the machine is
noisy.
"""

from geozoom_ros.cli import register_modules

_BENCH_MODULES = (
    'geozoom_ros.tiles.bench',
    'geozoom_ros.world.bench',
    'geozoom_ros.ros.bench',
    'geozoom_ros.model.bench',
    'geozoom_ros.runtime.bench',
)


def register(sub):
    """Add `geozoom bench` and the benchmarks of every area present."""
    parser = sub.add_parser('bench', help='run benchmarks and print measured figures')
    bench_sub = parser.add_subparsers(dest='bench', metavar='BENCH')
    bench_sub.required = True
    register_modules(bench_sub, _BENCH_MODULES)
