"""The zoom policy: one shared image encoder, per-view heads and the causal zoom decoder.

Tokens: the ground image gives one token ``g`` (with ``split_ground_halves`` the image is cut
into two square halves whose tokens are averaged, as in the paper); every cell view gives one
token ``s``. The map head pools the encoder's feature map onto the k x k child grid before it
projects, so a single token still says what lies in which child. With ``heading_input`` the
camera heading (degrees clockwise from north) is embedded (Fourier features, small MLP) and
added to ``g``: the map views stay north-up and query-independent, so a map index built once
serves every heading. Only ``encode_ground`` takes the heading; the decoder API is unchanged.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

from geozoom_ros.errors import InputError
from geozoom_ros.model.decoder import ZoomDecoder
from geozoom_ros.model.encoders import build_encoder, preprocess_images


class GroundHead(nn.Module):
    """Global feature [B, C] -> token [B, D]."""

    def __init__(self, c, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, fmap, pooled):
        return self.mlp(pooled)


class MapHead(nn.Module):
    """Feature map [B, C, h, w] -> token [B, D], keeping the k x k layout when pool='grid'."""

    def __init__(self, c, d, k, pool='grid', reduced=32):
        super().__init__()
        self.k, self.pool = k, pool
        extra = 0
        if pool == 'grid':
            self.reduce = nn.Conv2d(c, reduced, 1)
            extra = reduced * k * k
        self.mlp = nn.Sequential(nn.Linear(c + extra, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, fmap, pooled):
        feats = [pooled]
        if self.pool == 'grid':
            grid = F.adaptive_avg_pool2d(F.gelu(self.reduce(fmap)), self.k)
            feats.append(grid.flatten(1))
        return self.mlp(torch.cat(feats, dim=1))


class HeadingEmbed(nn.Module):
    """Heading (degrees clockwise from north) -> [B, D] via sin/cos of 1..4 x heading."""

    def __init__(self, d, harmonics=4):
        super().__init__()
        self.harmonics = harmonics
        self.mlp = nn.Sequential(nn.Linear(2 * harmonics, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, heading_deg):
        th = (heading_deg.float() * (math.pi / 180.0))[:, None]
        m = torch.arange(1, self.harmonics + 1, device=th.device, dtype=th.dtype)[None]
        return self.mlp(torch.cat((torch.sin(m * th), torch.cos(m * th)), dim=1))


class ImageModelBase(nn.Module):
    """Preprocessing shared by the zoom policy and the retrieval model."""

    def preprocess_ground(self, images):
        """Resize + normalise uint8 HxWx3 RGB ground images to [B, 3, H, W] float32."""
        w, h = self.config.ground_size
        return preprocess_images(images, (w, h))

    def preprocess_map(self, images):
        """Resize + normalise uint8 HxWx3 RGB map views to [B, 3, S, S] float32."""
        s = self.config.view_size
        return preprocess_images(images, (s, s))

    def _encode_ground_features(self, x):
        if self.config.split_ground_halves:
            w = x.shape[3]
            half = w // 2
            both = torch.cat((x[..., :half], x[..., w - half:]), dim=0)
            fmap, pooled = self.encoder(both)
            return fmap, pooled, 2
        fmap, pooled = self.encoder(x)
        return fmap, pooled, 1


def _halves_mean(t, n):
    return t if n == 1 else t.view(n, -1, *t.shape[1:]).mean(0)


class ZoomPolicy(ImageModelBase):
    """Just Zoom In's policy: encoder + per-view heads + causal decoder.

    ``config`` is a :class:`~geozoom_ros.model.config.PolicyConfig`. ``pretrained=False`` skips
    loading the encoder's ImageNet/backbone weights (a saved model brings its own).
    """

    kind = 'zoom_policy'

    def __init__(self, config, pretrained=True):
        super().__init__()
        config.validate()
        self.config = config
        d = config.embed_dim
        self.encoder = build_encoder(config, pretrained)
        c = self.encoder.out_dim
        self.ground_head = GroundHead(c, d)
        self.map_head = MapHead(c, d, config.grid_k, config.map_pool)
        self.heading_embed = HeadingEmbed(d) if config.heading_input else None
        self.decoder = ZoomDecoder(d, config.num_actions, config.decoder_layers,
                                   config.decoder_heads, config.dropout, config.action_head,
                                   config.match_dim, config.decoder_tokens)
        # Auxiliary contrastive projections (training only) and their temperature.
        self.aux_ground = nn.Linear(d, d)
        self.aux_map = nn.Linear(d, d)
        self.aux_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_ground(self, x, heading=None):
        """Return ground tokens [B, D] of normalised images [B, 3, H, W].

        ``heading``: camera heading in degrees clockwise from north, [B] (required when the
        model was built with ``heading_input``, ignored otherwise).
        """
        fmap, pooled, n = self._encode_ground_features(x)
        g = _halves_mean(self.ground_head(fmap, pooled), n)
        if self.heading_embed is not None:
            if heading is None:
                raise InputError('this model was trained with heading_input: pass the camera '
                                 'heading (degrees clockwise from north)')
            heading = torch.as_tensor(heading, device=g.device).float().reshape(-1)
            heading = heading.expand(g.shape[0])
            known = torch.isfinite(heading)
            # A frame without a heading (NaN) gets no heading term rather than a NaN token.
            h = self.heading_embed(torch.nan_to_num(heading, nan=0.0)).to(g.dtype)
            g = g + h * known[:, None].to(g.dtype)
        return g

    def encode_map(self, x):
        """Return cell-view tokens [B, D] of normalised north-up views [B, 3, S, S]."""
        fmap, pooled = self.encoder(x)
        return self.map_head(fmap, pooled)

    @property
    def uses_children(self):
        """True when a step is scored against the children's view tokens (match head)."""
        return self.config.action_head == 'match'

    def child_logits(self, out, child_tokens=None):
        """Turn step outputs [..., step_dim] into logits [..., k*k].

        ``child_tokens`` [..., k*k, D] (the view tokens of each step's children, row-major) are
        needed by a match head and ignored by a linear one.
        """
        if not self.uses_children:
            return out
        if child_tokens is None:
            raise InputError('this model scores children by their views (action_head: match): '
                             'pass the children\'s view tokens')
        keys = self.decoder.match_keys(child_tokens).to(out.dtype)
        return torch.einsum('...d,...kd->...k', out, keys)

    def forward(self, g, sat, actions):
        """Teacher-forced step outputs [B, T, step_dim] for ``[g, s0, a0, ..., s_{T-1}]``.

        With a linear head these are the logits [B, T, k*k]; a match head's outputs become
        logits through :meth:`child_logits`.

        ``g`` [B, D], ``sat`` [B, T, D] (views of the cells on the path, root first),
        ``actions`` [B, T] (long) the actions taken; logit t predicts action t and sees only
        ``g``, ``s_0..s_t`` and ``a_0..a_{t-1}``.
        """
        return self.decoder(g, sat, actions[:, :sat.shape[1] - 1])

    def step_logits(self, g, sat, actions):
        """Return the next step's outputs [B, step_dim].

        ``sat`` is [B, t+1, D] and ``actions`` [B, t]; the outputs are logits for a linear head
        (see :meth:`child_logits` for a match head).
        """
        return self.decoder(g, sat, actions)[:, -1]

    def aux_embeddings(self, g, s):
        """Return L2-normalised (ground, map) embeddings for the auxiliary contrastive loss."""
        return F.normalize(self.aux_ground(g), dim=-1), F.normalize(self.aux_map(s), dim=-1)
