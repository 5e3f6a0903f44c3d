"""`geozoom <subcommand>`: the command-line front end.

Each area of the package registers its own subcommands (``register(subparsers)`` in its
``cli`` module). Registration must stay cheap: heavy imports (torch, rasterio, moderngl) happen
inside the command functions, so ``geozoom --help`` is instant.
"""

import argparse
import importlib
import sys

from geozoom_ros import __version__
from geozoom_ros.errors import GeoZoomError

# Modules whose register(subparsers) adds subcommands, in the order `--help` lists them.
_COMMAND_MODULES = (
    'geozoom_ros.tiles.cli',
    'geozoom_ros.world.cli',
    'geozoom_ros.model.cli',
    'geozoom_ros.eval.cli',
    'geozoom_ros.eval.bagcli',
    'geozoom_ros.ros.cli',
    'geozoom_ros.demo',
    'geozoom_ros.bench',
    'geozoom_ros.runtime.cli',
)


def build_parser():
    """Return the top-level argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog='geozoom',
        description='Visual geo-localization by a learned zoom policy over an offline tile '
                    'pyramid.')
    parser.add_argument('--version', action='version', version='geozoom ' + __version__)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    register_modules(sub, _COMMAND_MODULES)
    return parser


def register_modules(sub, names):
    """Call ``register(sub)`` of each module in ``names`` that this install has."""
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # an area not present in this install
                continue
            raise
        module.register(sub)


def main(argv=None):
    """Run the CLI; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except GeoZoomError as exc:
        print(f'geozoom {args.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'geozoom {args.command}: interrupted', file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == '__main__':
    sys.exit(main())
