"""`geozoom bench model`: encoder/decoder latency and training throughput of a preset.

Builds the preset's model (ImageNet EfficientNet-Lite0 unless the preset names another
encoder), then times on random inputs: one ground frame encoded (the per-query cost floor), a
batch of cell views encoded (the indexing cost), one decoder step for a beam of hypotheses
(the per-level search cost), and full training steps (forward + backward + AdamW) of the zoom
policy, reported as samples per second. Medians over repeats; the first call is a warm-up.
"""


def register(bench_sub):
    """Add `geozoom bench model`."""
    p = bench_sub.add_parser('model', help='zoom policy: encode/decode latency, training '
                                           'samples per second')
    p.add_argument('--config', default=None, metavar='YAML',
                   help='training preset (default: config/train/cpu.yaml settings built in)')
    p.add_argument('--repeats', type=int, default=5, help='timed repeats (5)')
    p.add_argument('--batch-size', type=int, default=None, help='training batch (preset)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--json', action='store_true', help='print the figures as JSON')
    p.set_defaults(func=run)


def _median_ms(fn, repeats):
    import time

    import numpy as np

    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return float(np.median(times))


def run(args):
    """Run the benchmark; print figures (JSON with --json)."""
    import json

    import torch

    from geozoom_ros.model.config import load_preset, TrainPreset
    from geozoom_ros.model.encoders import freeze_early_layers
    from geozoom_ros.model.policy import ZoomPolicy
    from geozoom_ros.train.loop import param_groups, TrainStep

    preset = load_preset(args.config) if args.config else TrainPreset()
    if not args.config:
        preset.model.view_size, preset.model.ground_size = 96, (128, 96)
        preset.model.steps, preset.model.root_zoom, preset.model.decoder_layers = 3, 14, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, tc = preset.model, preset.train
    bs = args.batch_size or tc.batch_size
    torch.manual_seed(0)
    model = ZoomPolicy(cfg)
    w, h = cfg.ground_size
    s, t, d, k2 = cfg.view_size, cfg.steps, cfg.embed_dim, cfg.num_actions
    heading = torch.zeros(1) if cfg.heading_input else None
    out = {'encoder': cfg.encoder, 'ground_size': list(cfg.ground_size), 'view_size': s,
           'embed_dim': d, 'decoder_layers': cfg.decoder_layers, 'threads':
           torch.get_num_threads(), 'parameters': sum(p.numel() for p in model.parameters())}
    model.eval()
    with torch.inference_mode():
        g1 = torch.randn(1, 3, h, w)
        out['encode_ground_ms'] = _median_ms(lambda: model.encode_ground(g1, heading),
                                             args.repeats)
        views = torch.randn(32, 3, s, s)
        out['encode_map_32_ms'] = _median_ms(lambda: model.encode_map(views), args.repeats)
        beam = 8
        g = torch.randn(beam, d)
        sat = torch.randn(beam, t, d)
        acts = torch.randint(0, k2, (beam, t - 1))
        out['decoder_step_beam8_ms'] = _median_ms(lambda: model.step_logits(g, sat, acts),
                                                  args.repeats)
    freeze_early_layers(model.encoder, tc.encoder_frozen_blocks)
    model.train()
    step = TrainStep(model, 'zoom', tc)
    opt = torch.optim.AdamW(param_groups(model, tc))
    # About one unique view per sample per level below the root, as in a real batch.
    n_views = 1 + min(bs, k2) + bs * max(0, t - 2)
    batch = {'ground': torch.randn(bs, 3, h, w), 'heading': torch.zeros(bs),
             'views': torch.randn(n_views, 3, s, s),
             'view_idx': torch.randint(0, n_views, (bs, t)),
             'actions': torch.randint(0, k2, (bs, t)),
             'mask': torch.ones(bs, t, k2, dtype=torch.bool)}

    def train_step():
        loss, _ = step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    ms = _median_ms(train_step, max(2, args.repeats // 2))
    out['train_batch'] = bs
    out['train_views_per_batch'] = n_views
    out['train_step_ms'] = ms
    out['train_samples_per_s'] = bs / (ms / 1000.0)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f'{key:24s} {value:.1f}' if isinstance(value, float) else
                  f'{key:24s} {value}')
    return 0
