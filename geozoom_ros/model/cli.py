"""`geozoom train`: train a zoom policy or the retrieval baseline (torch imported lazily)."""


def add_train_arguments(parser):
    """Add the arguments of ``geozoom train`` (shared with ``-m geozoom_ros.train.loop``)."""
    parser.add_argument('--map', action='append', metavar='MAP',
                        help='tile pyramid (MBTiles file or XYZ folder); repeat together with '
                             '--data for several worlds')
    parser.add_argument('--data', action='append', metavar='DATA',
                        help='index.csv (path, lat, lon[, heading_deg, split]) or a folder of '
                             'JPEGs with EXIF GPS, one per --map')
    parser.add_argument('-o', '--output', required=True, metavar='MODEL_DIR',
                        help='folder for model.safetensors, config.json, checkpoint and log')
    parser.add_argument('--config', metavar='YAML',
                        help='training preset (config/train/*.yaml); default: built-in defaults')
    parser.add_argument('--method', choices=('zoom', 'retrieval'),
                        help='what to train (overrides the preset): the zoom policy or the '
                             'contrastive retrieval baseline')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run in MODEL_DIR from its checkpoint')
    parser.add_argument('--epochs', type=int, help='number of epochs (overrides the preset)')
    parser.add_argument('--max-minutes', type=float,
                        help='stop after this many minutes with a resumable checkpoint')
    parser.add_argument('--max-steps', type=int,
                        help='stop after this many optimiser steps with a resumable checkpoint')
    parser.add_argument('--batch-size', type=int, help='batch size per process')
    parser.add_argument('--threads', type=int, help='torch CPU threads')
    parser.add_argument('--device', default='auto', help='auto, cpu or cuda')
    parser.add_argument('--quiet', action='store_true', help='no progress output')


def register(sub):
    """Add the `train` subcommand."""
    parser = sub.add_parser(
        'train', help='train a zoom policy (or a retrieval baseline) on geotagged images',
        description='Train on (image, lat, lon) tables over one or more tile pyramids. '
                    'Data-parallel: torchrun --nproc_per_node=N -m geozoom_ros.train.loop '
                    '<the same arguments>.')
    add_train_arguments(parser)
    parser.set_defaults(func=_train)


def _train(args):
    from geozoom_ros.train.loop import run_from_args

    return run_from_args(args)
