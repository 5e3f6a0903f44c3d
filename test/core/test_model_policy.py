"""The zoom policy: decoder shapes and causal masking, heads, heading input, save/load."""

import json

import numpy as np
import pytest
import torch

from geozoom_ros.errors import ConfigError, InputError, MismatchError
from geozoom_ros.model.config import load_preset, PolicyConfig, TrainConfig
from geozoom_ros.model.decoder import ZoomDecoder
from geozoom_ros.model.io import load_model, model_hash, save_model
from geozoom_ros.model.policy import ZoomPolicy
from geozoom_ros.model.retrieval import multi_positive_infonce, RetrievalModel


def tiny(**kw):
    base = dict(embed_dim=32, grid_k=4, steps=3, root_zoom=14, view_size=32,
                ground_size=(48, 32), decoder_layers=2, decoder_heads=4, dropout=0.0)
    base.update(kw)
    return PolicyConfig(**base)


@pytest.mark.parametrize('layout', ['interleaved', 'fused'])
def test_decoder_shapes_and_causality(layout):
    torch.manual_seed(0)
    dec = ZoomDecoder(32, 16, layers=2, heads=4, dropout=0.0, tokens=layout).eval()
    x, sat_pos = dec.sequence(torch.randn(3, 32), torch.randn(3, 4, 32),
                              torch.randint(0, 16, (3, 3)))
    # Interleaved: g, s0, a0, s1, a1, s2, a2, s3; fused: g, s0, s1+a0, s2+a1, s3+a2.
    assert x.shape[1] == dec.tokens_through(3) == {'interleaved': 8, 'fused': 5}[layout]
    assert sat_pos == ([1, 3, 5, 7] if layout == 'interleaved' else [1, 2, 3, 4])
    g, sat = torch.randn(3, 32), torch.randn(3, 4, 32)
    actions = torch.randint(0, 16, (3, 4))
    logits = dec(g, sat, actions)
    assert logits.shape == (3, 4, 16)
    for t in range(4):
        # Changing the action taken at step t (and any later view) leaves logits 0..t alone.
        a2, s2 = actions.clone(), sat.clone()
        a2[:, t:] = (a2[:, t:] + 5) % 16
        s2[:, t + 1:] = torch.randn_like(s2[:, t + 1:])
        out = dec(g, s2, a2)
        assert torch.allclose(out[:, :t + 1], logits[:, :t + 1], atol=1e-6)
        if t < 3:
            assert not torch.allclose(out[:, t + 1:], logits[:, t + 1:], atol=1e-4)
    # Each action reaches the logits of the next step (fused into the view it led to).
    a3 = actions.clone()
    a3[:, 0] = (a3[:, 0] + 1) % 16
    assert not torch.allclose(dec(g, sat, a3)[:, 1], logits[:, 1], atol=1e-4)


def test_policy_api_and_step_logits_match_forward():
    torch.manual_seed(0)
    model = ZoomPolicy(tiny(), pretrained=False).eval()
    imgs = [np.random.default_rng(i).integers(0, 255, (60, 90, 3), dtype=np.uint8)
            for i in range(2)]
    x = model.preprocess_ground(imgs)
    assert x.shape == (2, 3, 32, 48) and x.dtype == torch.float32
    v = model.preprocess_map([np.zeros((50, 50, 3), np.uint8)] * 3)
    assert v.shape == (3, 3, 32, 32)
    with torch.no_grad():
        g = model.encode_ground(x)
        s = model.encode_map(torch.randn(2 * 3, 3, 32, 32)).view(2, 3, 32)
        actions = torch.randint(0, 16, (2, 3))
        full = model(g, s, actions)
        assert g.shape == (2, 32) and full.shape == (2, 3, 16)
        for t in range(3):
            step = model.step_logits(g, s[:, :t + 1], actions[:, :t])
            assert torch.allclose(step, full[:, t], atol=1e-5)
    with pytest.raises(InputError, match='uint8'):
        model.preprocess_ground([np.zeros((4, 4), np.float32)])


def test_match_head_scores_children_by_their_views_not_their_slots():
    torch.manual_seed(0)
    model = ZoomPolicy(tiny(action_head='match', match_dim=8), pretrained=False).eval()
    assert model.config.step_dim == 8 and model.uses_children
    g, s = torch.randn(2, 32), torch.randn(2, 3, 32)
    actions = torch.randint(0, 16, (2, 3))
    kids = torch.randn(2, 3, 16, 32)
    with torch.no_grad():
        q = model(g, s, actions)
        assert q.shape == (2, 3, 8)
        # Queries are unit vectors times the learned temperature; keys are unit vectors.
        scale = float(model.decoder.match_logit_scale.exp())
        assert torch.allclose(q.norm(dim=-1), torch.full((2, 3), scale), rtol=1e-5)
        keys = model.decoder.match_keys(kids)
        assert torch.allclose(keys.norm(dim=-1), torch.ones(2, 3, 16), rtol=1e-5)
        logits = model.child_logits(q, kids)
        assert logits.shape == (2, 3, 16)
        assert torch.allclose(logits, (q[:, :, None] * keys).sum(-1), atol=1e-5)
        # Moving the views to other slots moves their logits with them: a child is scored by
        # what its view shows, whichever slot it sits in.
        perm = torch.randperm(16)
        assert torch.allclose(model.child_logits(q, kids[:, :, perm]), logits[:, :, perm],
                              atol=1e-5)
        # Step-by-step outputs equal the teacher-forced ones.
        for t in range(3):
            assert torch.allclose(model.step_logits(g, s[:, :t + 1], actions[:, :t]), q[:, t],
                                  atol=1e-5)
    with pytest.raises(InputError, match='children'):
        model.child_logits(q)
    linear = ZoomPolicy(tiny(), pretrained=False).eval()
    out = torch.randn(2, 16)
    assert linear.child_logits(out, kids[:, 0]) is out  # a linear head ignores the views
    with pytest.raises(ConfigError, match='action_head'):
        tiny(action_head='pointer').validate()


def test_heading_input_changes_only_the_ground_token():
    torch.manual_seed(0)
    model = ZoomPolicy(tiny(heading_input=True), pretrained=False).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        a = model.encode_ground(x, torch.tensor([0.0, 90.0]))
        b = model.encode_ground(x, torch.tensor([360.0, 180.0]))
        nan = model.encode_ground(x, torch.tensor([float('nan'), 90.0]))
    assert torch.allclose(a[0], b[0], atol=1e-5) and not torch.allclose(a[1], b[1])
    assert torch.isfinite(nan).all() and torch.allclose(nan[1], a[1])
    with pytest.raises(InputError, match='heading'):
        model.encode_ground(x)


def test_split_ground_halves_averages_half_tokens():
    torch.manual_seed(0)
    model = ZoomPolicy(tiny(split_ground_halves=True, ground_size=(64, 32)),
                       pretrained=False).eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        g = model.encode_ground(x)
        left = model.ground_head(*model.encoder(x[..., :32]))
        right = model.ground_head(*model.encoder(x[..., 32:]))
    assert torch.allclose(g, (left + right) / 2, atol=1e-5)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    for cls in (ZoomPolicy, RetrievalModel):
        model = cls(tiny(heading_input=cls is ZoomPolicy), pretrained=False).eval()
        out = save_model(model, tmp_path / cls.kind, extra_meta={'note': 'x'})
        loaded = load_model(out)
        assert type(loaded) is cls and loaded.config == model.config
        assert loaded.meta == {'note': 'x'}
        for (k, v), (k2, v2) in zip(model.state_dict().items(),
                                    loaded.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
        cfg = json.loads((out / 'config.json').read_text())
        assert cfg['kind'] == cls.kind and cfg['model_sha256'] == model_hash(out)
        assert not list(out.glob('.*'))  # no temporary files left behind
        assert (out / 'model.safetensors').stat().st_mode & 0o044  # readable by others
    # A folder that mixes two models is refused.
    (tmp_path / 'retrieval' / 'model.safetensors').write_bytes(
        (tmp_path / 'zoom_policy' / 'model.safetensors').read_bytes())
    with pytest.raises(MismatchError, match='sha256'):
        load_model(tmp_path / 'retrieval')
    with pytest.raises(InputError, match='not a model folder'):
        load_model(tmp_path / 'nothing.bin')


def test_config_is_strict(tmp_path):
    with pytest.raises(ConfigError, match='unknown key'):
        PolicyConfig.from_dict({'embed_dim': 64, 'embbed_dim': 3})
    with pytest.raises(ConfigError, match='must be an integer'):
        PolicyConfig.from_dict({'embed_dim': 'big'})
    with pytest.raises(ConfigError, match='power of two'):
        PolicyConfig.from_dict({'grid_k': 3})
    with pytest.raises(ConfigError, match='unknown key'):
        TrainConfig.from_dict({'lr': 1e-3, 'learning_rate': 1e-3})
    preset = tmp_path / 'p.yaml'
    preset.write_text('method: zoom\nmodel: {embed_dim: 64, steps: 3}\ntrain: {epochs: 2}\n')
    p = load_preset(preset)
    assert p.model.embed_dim == 64 and p.model.steps == 3 and p.train.epochs == 2
    preset.write_text('method: zoom\nmodle: {}\n')
    with pytest.raises(ConfigError, match='unknown section'):
        load_preset(preset)
    c = PolicyConfig(root_zoom=14, steps=3)
    assert c.terminal_zoom == 20 and c.num_actions == 16
    assert PolicyConfig.from_dict(c.to_dict()) == c


def test_shipped_presets_parse():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[2] / 'config' / 'train').glob('*.yaml'))
    assert {p.name for p in presets} >= {'cpu-small.yaml', 'cpu.yaml', 'gpu.yaml',
                                         'cpu-multiworld.yaml'}
    for p in presets:
        preset = load_preset(p)
        preset.model.validate()
        preset.train.validate(str(p))
        assert preset.method in ('zoom', 'retrieval')


def test_multi_positive_infonce():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    k = q[[0, 2]].clone()
    pos = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    good = multi_positive_infonce(q, k, pos, torch.tensor(20.0))
    bad = multi_positive_infonce(q, k, ~pos, torch.tensor(20.0))
    assert good < bad


@pytest.mark.filterwarnings('ignore')
def test_policy_exports_to_onnx():
    import io

    import onnxruntime as ort

    torch.manual_seed(0)
    model = ZoomPolicy(tiny(heading_input=True), pretrained=False).eval()

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, g, sat, a):
            return self.m.step_logits(g, sat, a)

    class Ground(Step):
        def forward(self, x, h):
            return self.m.encode_ground(x, h)

    cases = [(Step(), (torch.randn(2, 32), torch.randn(2, 3, 32), torch.randint(0, 16, (2, 2)))),
             (Ground(), (torch.randn(2, 3, 32, 48), torch.tensor([10.0, float('nan')])))]
    for module, args in cases:
        f = io.BytesIO()
        torch.onnx.export(module, args, f, dynamo=False, opset_version=17)
        sess = ort.InferenceSession(f.getvalue())
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        out = sess.run(None, feeds)[0]
        with torch.no_grad():
            ref = module(*args).numpy()
        assert np.abs(out - ref).max() < 1e-4
