"""`geozoom export`: the policy as ONNX graphs (and TensorRT engines where TensorRT exists)."""


def register(sub):
    """Add the `export` subcommand."""
    parser = sub.add_parser(
        'export', help='export a zoom policy to ONNX (or build TensorRT engines)',
        description='Write the ground encoder and the decoder steps as static-shape ONNX graphs '
                    '(checked with onnx.checker) and a manifest.json into DIR; with --format '
                    'tensorrt also build TensorRT engines cached beside them.')
    parser.add_argument('--model', required=True, metavar='MODEL',
                        help='model folder written by geozoom train')
    parser.add_argument('-o', '--output', required=True, metavar='DIR', help='export folder')
    parser.add_argument('--format', choices=('onnx', 'tensorrt'), default='onnx')
    parser.add_argument('--fp16', action='store_true', default=None,
                        help='FP16 TensorRT engines (the default for --format tensorrt)')
    parser.add_argument('--fp32', dest='fp16', action='store_false',
                        help='FP32 TensorRT engines')
    parser.add_argument('--beam', type=int, default=8,
                        help='fixed decoder batch (beam width) of the graphs (default 8)')
    parser.add_argument('--decoder', choices=('kv', 'per-step', 'full'), default=None,
                        help='decoder graphs: kv (per step with a key/value cache; the ONNX '
                             'default), per-step (stateless; what TensorRT compiles) or full '
                             '(one fixed-length graph)')
    parser.add_argument('--quiet', action='store_true', help='no progress output')
    parser.set_defaults(func=_export)


def _export(args):
    from pathlib import Path

    from geozoom_ros.errors import InputError
    from geozoom_ros.model.io import model_hash
    from geozoom_ros.runtime.export import export_onnx, model_dir

    mdir = model_dir(args.model)
    if not (mdir / 'config.json').is_file():
        raise InputError(f'--model {args.model}: no config.json there; pass the folder written '
                         'by geozoom train')
    if args.fp16 is not None and args.format != 'tensorrt':
        raise InputError('--fp16/--fp32 apply to --format tensorrt only; ONNX graphs are FP32')
    if args.format == 'tensorrt':
        # Say that TensorRT is missing before spending time on the ONNX export.
        from geozoom_ros.runtime.tensorrt_backend import _import_trt
        _import_trt()
    decoder = args.decoder or ('per-step' if args.format == 'tensorrt' else 'kv')
    if args.format == 'tensorrt' and decoder != 'per-step':
        raise InputError(f'--decoder {decoder} cannot go with --format tensorrt; the TensorRT '
                         'backend runs the stateless per-step graphs (omit --decoder)')
    manifest = export_onnx(mdir, args.output, beam=args.beam, decoder=decoder,
                           progress=not args.quiet)
    print(f'wrote {len(manifest["files"])} ONNX graphs (opset {manifest["opset"]}, model '
          f'{manifest["model_hash"][:12]}) to {Path(args.output)}')
    if args.format == 'tensorrt':
        from geozoom_ros.runtime.tensorrt_backend import build_engines

        paths = build_engines(args.output, model_hash(mdir),
                              fp16=True if args.fp16 is None else args.fp16)
        print(f'TensorRT engines in {next(iter(paths.values())).parent}')
    return 0
