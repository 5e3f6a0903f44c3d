"""Strict configuration of the zoom policy, the retrieval baseline and their training.

One source of truth: the YAML presets under ``config/train/``, the ``config.json`` written next
to every model file and the CLI flags all map onto these dataclasses. Unknown keys and values of
the wrong type raise :class:`~geozoom_ros.errors.ConfigError`. This module imports no torch.

Cell geometry: the policy zooms from a root cell at ``root_zoom`` through ``steps`` choices on a
``grid_k`` x ``grid_k`` grid, so the terminal cell is at zoom
``root_zoom + steps * log2(grid_k)``. The paper's setting is root zoom 12 (about 10 km at
mid-latitudes) and 4 steps of a 4 x 4 grid, terminal zoom 20 (about 39 m at the equator, 27 m at
45 degrees). The presets keep it even for 1-2 km worlds: such a world then usually lies under a
single root, and the first step, which picks the world's part of the root, is nearly free (the
root and level-1 views are shared by every sample of a batch). Zoom-14 roots with 3 steps reach
the same terminal cells but split a 1 km world into 2-4 roots, and a decoder trained inside
each root ranks paths across roots poorly.
"""

from dataclasses import asdict, dataclass, field, fields
import json
import math
from pathlib import Path

from geozoom_ros.errors import ConfigError

ENCODERS_BUILTIN = ('efficientnet_lite0', 'dinov2_vitb14', 'dinov2_vits14', 'dinov2_vitl14')
#: Sequence layouts of the zoom decoder (``PolicyConfig.decoder_tokens``).
DECODER_TOKENS = ('interleaved', 'fused')


def _check_fields(cls, data, where):
    if not isinstance(data, dict):
        raise ConfigError(f'{where}: expected a mapping of {cls.__name__} fields, '
                          f'got {type(data).__name__}')
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {", ".join(unknown)} for {cls.__name__}; '
                          f'valid keys: {", ".join(sorted(names))}')


def _coerce(cls, data, where):
    """Build ``cls`` from a dict, checking keys and basic types."""
    _check_fields(cls, data, where)
    defaults = cls()
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = getattr(defaults, f.name)
        kwargs[f.name] = _coerce_value(value, default, f'{where}: {f.name}')
    obj = cls(**kwargs)
    obj.validate(where)
    return obj


def _coerce_value(value, default, where):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f'{where} must be true or false, got {value!r}')
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{where} must be an integer, got {value!r}')
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{where} must be a number, got {value!r}')
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f'{where} must be a list of {len(default)} values, got {value!r}')
        return tuple(_coerce_value(v, d, where) for v, d in zip(value, default))
    if isinstance(default, str) and default is not None:
        if not isinstance(value, str):
            raise ConfigError(f'{where} must be a string, got {value!r}')
        return value
    # Optional fields (default None): a string or None.
    if value is not None and not isinstance(value, (str, int, float)):
        raise ConfigError(f'{where} has an unsupported value {value!r}')
    return value


@dataclass
class PolicyConfig:
    """Architecture and cell geometry of a zoom policy or a retrieval model.

    Image sizes are pixels; ``context_m`` is metres. ``ground_size`` is (width, height).
    """

    #: 'efficientnet_lite0' (ImageNet weights, offline), 'timm:<name>' or 'dinov2_vitb14'
    #: (also dinov2_vits14 / dinov2_vitl14); timm and DINOv2 need ``encoder_weights``.
    encoder: str = 'efficientnet_lite0'
    #: Local weights file (.pth/.pt/.safetensors); None = the packaged ImageNet Lite0 weights.
    encoder_weights: str = None
    #: Width of the image tokens and of the decoder.
    embed_dim: int = 256
    grid_k: int = 4
    steps: int = 4
    root_zoom: int = 12
    #: Side of a rendered (north-up) cell view, pixels.
    view_size: int = 384
    #: Ground image size fed to the encoder, (width, height) pixels.
    ground_size: tuple = (768, 384)
    decoder_layers: int = 6
    decoder_heads: int = 8
    dropout: float = 0.1
    #: When true the ground token is fused with the camera heading (degrees clockwise from
    #: north), so map views stay north-up and the map index stays query-independent.
    heading_input: bool = False
    #: Paper: the ground image is cut into two square halves whose tokens are averaged.
    split_ground_halves: bool = False
    #: 'grid': the map head pools the feature map onto the k x k child grid before projecting,
    #: so the token says what lies in which child; 'avg': global average pooling.
    map_pool: str = 'grid'
    #: How a decoder step scores the k*k children. 'linear': a learned k*k-way head over the
    #: decoder state (the paper's). 'match': the decoder state becomes a query that is compared
    #: with a key made from each child's own view token, so a child is chosen by what its view
    #: shows, never by its slot; keys are computed once per map and kept in the bundle.
    action_head: str = 'linear'
    #: Width of the query and key vectors of ``action_head: match``.
    match_dim: int = 64
    #: How the decoder's sequence carries the actions. 'interleaved' (the paper's):
    #: ``[g, s0, a0, s1, a1, ..., s_t]``, an action token between views. 'fused':
    #: ``[g, s0, s1 + a0, s2 + a1, ...]``, each action's embedding added to the view it led to:
    #: the same information in one token per step, so a search feeds the decoder half the
    #: tokens (and its cache holds half the keys).
    decoder_tokens: str = 'interleaved'
    #: Keep batch-norm running statistics frozen at their ImageNet values while fine-tuning.
    freeze_bn: bool = True
    #: Retrieval only: side of the overhead crop centred on a terminal cell (metres) and
    #: whether crops are rotated so the camera heading points up.
    context_m: float = 100.0
    heading_aligned: bool = False

    @property
    def levels_per_step(self):
        """Zoom levels per step (log2 of ``grid_k``)."""
        return int(round(math.log2(self.grid_k)))

    @property
    def terminal_zoom(self):
        """Zoom of the terminal cells."""
        return self.root_zoom + self.steps * self.levels_per_step

    @property
    def num_actions(self):
        """Number of children per step (k*k)."""
        return self.grid_k * self.grid_k

    @property
    def step_dim(self):
        """Width of one decoder step's output: k*k logits, or the query of a match head."""
        return self.match_dim if self.action_head == 'match' else self.num_actions

    def validate(self, where='PolicyConfig'):
        """Raise ConfigError if a value is out of range."""
        e = self.encoder
        if not (e in ENCODERS_BUILTIN or (e.startswith('timm:') and len(e) > 5)):
            raise ConfigError(f'{where}: encoder {e!r} is not supported; use '
                              f'{", ".join(ENCODERS_BUILTIN)} or timm:<model name>')
        if self.grid_k < 2 or self.grid_k & (self.grid_k - 1):
            raise ConfigError(f'{where}: grid_k={self.grid_k} must be a power of two >= 2')
        if self.steps < 1:
            raise ConfigError(f'{where}: steps={self.steps} must be >= 1')
        if not 0 <= self.root_zoom or self.terminal_zoom > 24:
            raise ConfigError(f'{where}: root_zoom={self.root_zoom} with {self.steps} steps '
                              f'reaches zoom {self.terminal_zoom}; keep it within 0..24')
        if self.embed_dim < 8 or self.embed_dim % self.decoder_heads:
            raise ConfigError(f'{where}: embed_dim={self.embed_dim} must be >= 8 and a multiple '
                              f'of decoder_heads={self.decoder_heads}')
        if (self.embed_dim // self.decoder_heads) % 2:
            raise ConfigError(f'{where}: embed_dim / decoder_heads must be even (RoPE)')
        if self.view_size < 16 or min(self.ground_size) < 16:
            raise ConfigError(f'{where}: view_size and ground_size must be >= 16 pixels')
        if self.decoder_layers < 1:
            raise ConfigError(f'{where}: decoder_layers must be >= 1')
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f'{where}: dropout={self.dropout} must be in [0, 1)')
        if self.map_pool not in ('grid', 'avg'):
            raise ConfigError(f'{where}: map_pool={self.map_pool!r} must be grid or avg')
        if self.context_m <= 0:
            raise ConfigError(f'{where}: context_m must be > 0 metres')
        if self.action_head not in ('linear', 'match'):
            raise ConfigError(f'{where}: action_head={self.action_head!r} must be linear or '
                              'match')
        if self.match_dim < 4:
            raise ConfigError(f'{where}: match_dim={self.match_dim} must be >= 4')
        if self.decoder_tokens not in DECODER_TOKENS:
            raise ConfigError(f'{where}: decoder_tokens={self.decoder_tokens!r} must be '
                              f'{" or ".join(DECODER_TOKENS)}')

    def to_dict(self):
        """Return a JSON-ready dict."""
        d = asdict(self)
        d['ground_size'] = list(self.ground_size)
        return d

    @classmethod
    def from_dict(cls, data, where='PolicyConfig'):
        """Build from a dict; unknown keys raise ConfigError."""
        return _coerce(cls, dict(data), where)


@dataclass
class TrainConfig:
    """Optimisation, augmentation and validation settings of ``geozoom train``."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4
    #: The pretrained encoder learns at ``lr * encoder_lr_mult``.
    encoder_lr_mult: float = 0.3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    #: Cosine decay ends at ``lr * final_lr_frac``.
    final_lr_frac: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    #: Weight of the auxiliary symmetric InfoNCE between the ground token and the token of the
    #: deepest cell view in the sequence (zoom method); 0 disables it.
    aux_contrastive_weight: float = 0.5
    #: Which views the auxiliary InfoNCE pairs with the ground token: 'last' (the deepest view
    #: of the sequence) or 'all' (one InfoNCE per level, averaged: every level's embedding is
    #: then a trained cross-view match, which the root shortlist relies on at level 1).
    aux_levels: str = 'last'
    #: Match head only: the share of training samples whose zoom path is laid on a grid moved
    #: by a random offset (whole cells of the level above the terminal one), so the coarse
    #: levels show many distinct views instead of the map grid's few. 0 = the map's grid only.
    grid_shift: float = 0.0
    #: 'auto' (bf16 on CUDA where supported, else fp16; off on CPU), 'bf16', 'fp16', 'off'.
    amp: str = 'auto'
    #: Validate (greedy decode, Recall@1 within 50 m) every N epochs; 0 = never.
    val_every: int = 1
    val_max_queries: int = 256
    #: Split names used for training and validation (index.csv 'split' column).
    train_split: str = 'train'
    val_split: str = 'val'
    #: Without a split column, this fraction of rows (by a seeded draw) validates.
    val_frac: float = 0.05
    #: Leave cells that hold only held-out views out of the training softmax.
    mask_heldout_cells: bool = True
    num_workers: int = 0
    #: Decode and keep every ground image in memory at training resolution.
    preload: bool = True
    #: Keep the encoder's stem and its first N blocks frozen (EfficientNet blocks, 16 in all; ViT
    #: blocks for DINOv2): high-resolution early layers cost most in the backward pass and are
    #: the most generic. 0 = everything trains.
    encoder_frozen_blocks: int = 0
    #: torch intra-op threads (0 = torch's default).
    threads: int = 0
    seed: int = 0
    # Augmentation (ground): probability of colour jitter / blur and crop scale range.
    aug_color: float = 0.8
    aug_blur: float = 0.3
    aug_crop_min: float = 0.7
    # Augmentation (map): rotation (degrees) and shift (fraction of the view side).
    aug_map_rot_deg: float = 5.0
    aug_map_shift: float = 0.04
    aug_map_color: float = 0.5
    #: Heading noise added to the ground truth heading during training (degrees, 1 sigma).
    heading_noise_deg: float = 5.0
    #: Stop (with a resumable checkpoint) after this many minutes; 0 = no limit.
    max_minutes: float = 0.0

    def validate(self, where='TrainConfig'):
        """Raise ConfigError if a value is out of range."""
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(f'{where}: epochs must be >= 1 and batch_size >= 2')
        if self.lr <= 0 or self.encoder_lr_mult < 0:
            raise ConfigError(f'{where}: lr must be > 0 and encoder_lr_mult >= 0')
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.final_lr_frac <= 1:
            raise ConfigError(f'{where}: warmup_frac must be in [0, 1) and final_lr_frac in '
                              '[0, 1]')
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f'{where}: label_smoothing must be in [0, 1)')
        if self.amp not in ('auto', 'bf16', 'fp16', 'off'):
            raise ConfigError(f'{where}: amp={self.amp!r} must be auto, bf16, fp16 or off')
        if not 0 <= self.val_frac < 1:
            raise ConfigError(f'{where}: val_frac must be in [0, 1)')
        if not 0 < self.aug_crop_min <= 1:
            raise ConfigError(f'{where}: aug_crop_min must be in (0, 1]')
        if not 0 <= self.grid_shift <= 1:
            raise ConfigError(f'{where}: grid_shift={self.grid_shift} must be in [0, 1]')
        if self.aux_levels not in ('last', 'all'):
            raise ConfigError(f'{where}: aux_levels={self.aux_levels!r} must be last or all')

    def to_dict(self):
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where='TrainConfig'):
        """Build from a dict; unknown keys raise ConfigError."""
        return _coerce(cls, dict(data), where)


@dataclass
class TrainPreset:
    """A training preset file: ``method``, ``model:`` (PolicyConfig) and ``train:`` sections."""

    method: str = 'zoom'
    model: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_preset(path):
    """Read a YAML/JSON preset into a :class:`TrainPreset`; unknown keys raise ConfigError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'{path}: no such config file; see config/train/*.yaml for presets')
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == '.json' else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f'{path}: cannot parse ({exc.__class__.__name__}: '
                          f'{str(exc).splitlines()[0]}); fix the file') from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping with method/model/train sections')
    unknown = sorted(set(data) - {'method', 'model', 'train'})
    if unknown:
        raise ConfigError(f'{path}: unknown section(s) {", ".join(unknown)}; '
                          'valid: method, model, train')
    method = data.get('method', 'zoom')
    if method not in ('zoom', 'retrieval'):
        raise ConfigError(f'{path}: method={method!r} must be zoom or retrieval')
    return TrainPreset(method=method,
                       model=PolicyConfig.from_dict(data.get('model') or {}, f'{path}: model'),
                       train=TrainConfig.from_dict(data.get('train') or {}, f'{path}: train'))
