"""The contrastive retrieval baseline (Sample4Geo's family) on the policy's encoder family.

One shared encoder, a small projection head per view and a learnable temperature, trained with
symmetric InfoNCE between ground images and overhead crops of ``context_m`` metres centred on
the terminal cell that holds the camera. With ``heading_aligned`` the crops are rotated so the
camera heading points up (map crops then depend on the query's heading; an index can store each
terminal cell at a few quantised headings).
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

from geozoom_ros.model.encoders import build_encoder
from geozoom_ros.model.policy import _halves_mean, ImageModelBase


class RetrievalModel(ImageModelBase):
    """Ground / overhead embedding model for nearest-neighbour retrieval of terminal cells."""

    kind = 'retrieval'

    def __init__(self, config, pretrained=True):
        super().__init__()
        config.validate()
        self.config = config
        e = config.embed_dim
        self.encoder = build_encoder(config, pretrained)
        c = self.encoder.out_dim
        self.ground_head = nn.Sequential(nn.Linear(c, 2 * e), nn.GELU(), nn.Linear(2 * e, e))
        self.map_head = nn.Sequential(nn.Linear(c, 2 * e), nn.GELU(), nn.Linear(2 * e, e))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_ground(self, x):
        """Return L2-normalised ground embeddings [B, E] of normalised images [B, 3, H, W]."""
        fmap, pooled, n = self._encode_ground_features(x)
        return F.normalize(_halves_mean(self.ground_head(pooled), n), dim=-1)

    def embed_map(self, x):
        """Return L2-normalised overhead embeddings [B, E] of normalised crops [B, 3, S, S]."""
        fmap, pooled = self.encoder(x)
        return F.normalize(self.map_head(pooled), dim=-1)

    def forward(self, ground, overhead):
        """Return (ground embeddings, overhead embeddings, logit scale)."""
        return self.embed_ground(ground), self.embed_map(overhead), self.scale()

    def scale(self):
        """Return the InfoNCE logit scale, 1 / temperature, clamped to at most 100."""
        return self.logit_scale.exp().clamp(max=100.0)


def multi_positive_infonce(q, k, pos, scale):
    """Symmetric InfoNCE where a query may have several positive keys.

    ``q`` [B, E] and ``k`` [U, E] are L2-normalised, ``pos`` [B, U] bool marks the positives
    (every row and every column has at least one). Returns the mean of the query->key and
    key->query losses.
    """
    logits = scale * (q @ k.t()).float()
    neg_inf = torch.finfo(logits.dtype).min
    lq = torch.logsumexp(logits.masked_fill(~pos, neg_inf), 1) - torch.logsumexp(logits, 1)
    lk = torch.logsumexp(logits.masked_fill(~pos, neg_inf), 0) - torch.logsumexp(logits, 0)
    return -(lq.mean() + lk.mean()) / 2
