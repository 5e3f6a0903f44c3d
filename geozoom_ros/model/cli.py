"""`geozoom train` and `geozoom distill` (torch imported lazily).

`train` trains a zoom policy or the retrieval baseline; `distill` a smaller decoder on a trained
policy's frozen encoders.
"""


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
    parser = sub.add_parser(
        'distill', help='train a smaller decoder on a zoom policy\'s frozen encoders',
        description='Keep a trained zoom policy\'s encoders and train a decoder of fewer '
                    'layers on their cached tokens, distilling the teacher\'s step '
                    'distributions (minutes on a CPU). The student is a complete model folder; '
                    'fit its calibration again with geozoom calibrate.')
    parser.add_argument('--teacher', required=True, metavar='MODEL',
                        help='the trained zoom-policy folder whose encoders are kept')
    parser.add_argument('--map', action='append', metavar='MAP',
                        help='tile pyramid the teacher was trained on; repeat with --data')
    parser.add_argument('--data', action='append', metavar='DATA',
                        help='index.csv with the teacher\'s train/val splits, one per --map')
    parser.add_argument('-o', '--output', required=True, metavar='MODEL_DIR',
                        help='folder for the student model')
    parser.add_argument('--layers', type=int, default=1, help='decoder blocks of the student')
    parser.add_argument('--passes', type=int, default=6,
                        help='augmentation draws of each training view cached (first: none)')
    parser.add_argument('--steps', type=int, default=3000, help='optimiser steps')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--lr', type=float, default=1e-3, help='peak learning rate (AdamW)')
    parser.add_argument('--kd-weight', type=float, default=1.0,
                        help='weight of the KL divergence from the teacher (0: labels only)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: default)')
    parser.add_argument('--device', default='cpu',
                        help='cpu, cuda or auto: where the teacher encodes the cached tokens '
                             'and validates (the student trains on the CPU)')
    parser.add_argument('--quiet', action='store_true', help='no progress output')
    parser.set_defaults(func=_distill)


def _train(args):
    from geozoom_ros.train.loop import run_from_args

    return run_from_args(args)


def _distill(args):
    from geozoom_ros.train.distill import run_from_args

    return run_from_args(args)
