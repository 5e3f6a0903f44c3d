"""The ROS-free localizer: one camera frame in, one geo fix with a covariance out.

``GeoZoomLocalizer`` loads a map bundle and a model through a backend once, then for each frame
encodes the image (the only per-frame network pass over pixels) and searches the cell tree
with the bundle's cached map tokens. The fused search (method 'zoom-fused') also encodes the
frame with a retrieval model and weighs every zoom step with the retrieval mass of each
child, read from the bundle's cached crop embeddings. The ROS node is a thin shell around
this class; everything it does can be tested without ROS. No torch or rclpy at module level.
"""

from dataclasses import dataclass, field
import math
import time

import numpy as np

from geozoom_ros.bundle import load_bundle
from geozoom_ros.calibration import resolve as calibration_resolve
from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.runtime.base import check_images
from geozoom_ros.search import (DEFAULT_ZOOM_WEIGHT, evidence_usable, Prior,
                                retrieval_evidence, search)

METHODS = ('zoom', 'zoom-beam', 'zoom-fused')


@dataclass
class Fix:
    """A position fix.

    Attributes:
        lat, lon: degrees (WGS84) of the best terminal cell's centre.
        cov_en: 2x2 covariance of (east, north) in m^2, in the local ENU frame at the fix.
        confidence: probability of the best hypothesis (0..1); see ``geozoom_ros.search``.
        cell: the best terminal cell (mercantile Tile).
        hypotheses: the search's hypotheses, most probable first.
        latency_ms: ``{'encoder', 'search', 'total'}`` wall times in milliseconds (the
            fused search's encoder time counts both encoders).
        method: the search that ran ('zoom-fused' runs as 'zoom-beam' for a frame it cannot
            weigh: see ``GeoZoomLocalizer.retrieval_evidence``).
    """

    lat: float
    lon: float
    cov_en: np.ndarray
    confidence: float
    cell: object
    hypotheses: list
    latency_ms: dict = field(default_factory=dict)
    method: str = None

    @property
    def sigma_m(self):
        """Return the 1-sigma radius in metres (square root of the mean variance)."""
        return math.sqrt(0.5 * float(np.trace(self.cov_en)))

    def position_covariance(self):
        """Return the row-major 3x3 ENU covariance (m^2) of NavSatFix (vertical: 1e6 m^2).

        NavSatFix's ``position_covariance`` is east, north, up; the height is unknown, so its
        variance is large rather than zero.
        """
        c = np.zeros((3, 3))
        c[:2, :2] = self.cov_en
        c[2, 2] = 1e6
        return c.ravel().tolist()


class GeoZoomLocalizer:
    """Localise camera frames on a map bundle with a zoom policy.

    Args:
        bundle_path: a bundle written by ``geozoom index``.
        model_path: the model the bundle was built with.
        backend: 'auto', 'torch', 'onnxruntime', 'tensorrt', or a ready PolicyBackend.
        beam_width: width of the beam search (methods 'zoom-beam' and 'zoom-fused').
        method: 'zoom-beam' (default), 'zoom' (greedy) or 'zoom-fused' (beam search on the
            decoder's and ``retrieval_model``'s step distributions together; see
            ``geozoom_ros.search``).
        retrieval_model: the contrastive retrieval model of method 'zoom-fused'; the bundle
            must hold its crop embeddings (``geozoom index --with-retrieval``).
        zoom_weight: the decoder's weight against the retrieval evidence ('zoom-fused').
        cov_scale: factor applied to every published covariance after the calibration (1
            keeps it).
        residual_cov: add the probability mass outside the hypotheses, spread over the
            searched region, to the covariance (see ``geozoom_ros.search``).
        max_roots: on a map with more root cells than this, search only the ``max_roots``
            roots the policy's cross-view embedding ranks best (see
            ``geozoom_ros.shortlist``); 0 searches every root.
        shortlist_level: the token level whose cells rank the roots (1: 16 cells per root).
        calibration: the covariance calibration (``geozoom_ros.calibration``): 'auto' uses
            ``<model_dir>/calibration.json`` when present; None, False or 'none' none; or a path
            to a calibration.json (or a ready Calibration). It applies when it has an entry for
            ``method``; a file fitted for another model raises MismatchError.
        backend_options: keyword arguments for the backend (e.g. ``device='cuda'``).
    """

    def __init__(self, bundle_path, model_path, backend='auto', beam_width=8,
                 method='zoom-beam', cov_scale=1.0, residual_cov=False, max_roots=4,
                 shortlist_level=1, calibration='auto', retrieval_model=None,
                 zoom_weight=DEFAULT_ZOOM_WEIGHT, **backend_options):
        if method not in METHODS:
            raise ConfigError(f'method {method!r} is unknown; use one of {", ".join(METHODS)}')
        if method == 'zoom-fused' and not retrieval_model:
            raise ConfigError('method zoom-fused needs retrieval_model: the retrieval model '
                              'whose crop embeddings the bundle holds')
        if not (math.isfinite(zoom_weight) and zoom_weight >= 0):
            raise ConfigError(f'zoom_weight={zoom_weight} must be a finite number >= 0')
        if int(beam_width) < 1:
            raise ConfigError(f'beam_width={beam_width} must be >= 1')
        if not (math.isfinite(cov_scale) and cov_scale > 0):
            raise ConfigError(f'cov_scale={cov_scale} must be a positive number')
        if isinstance(backend, str):
            from geozoom_ros.runtime import load_backend, search_defaults
            backend = load_backend(backend, model_path,
                                   defaults=search_defaults(method, beam_width),
                                   **backend_options)
        self.backend = backend
        self.bundle = load_bundle(bundle_path, backend)
        self.method = method
        self.beam_width = int(beam_width)
        self.cov_scale = float(cov_scale)
        self.residual_cov = bool(residual_cov)
        if int(max_roots) < 0:
            raise ConfigError(f'max_roots={max_roots} must be >= 0 (0 searches every root)')
        self.max_roots = int(max_roots)
        self.shortlist = None
        if 0 < self.max_roots < len(self.bundle.roots):
            from geozoom_ros.shortlist import load_aux_weights, RootShortlist

            self.shortlist = RootShortlist(self.bundle, load_aux_weights(model_path),
                                           level=shortlist_level)
        self.calibration = calibration_resolve(calibration, model_path,
                                               getattr(self.backend, 'model_hash', None))
        self.cov_model = self.calibration.model_for(method) if self.calibration else None
        self.zoom_weight = float(zoom_weight)
        self.retrieval = None
        if method == 'zoom-fused':
            from geozoom_ros.runtime import load_retrieval

            self.retrieval = load_retrieval(retrieval_model, self.backend,
                                            threads=backend_options.get('threads'),
                                            device=backend_options.get('device', 'cpu'),
                                            bundle=self.bundle)
            self.retrieval_scale = self.retrieval.scale()

    def fix_covariance(self, cov_en, confidence, method=None):
        """Return the published 2x2 east/north covariance (m^2) of a search's covariance.

        The calibration for the search that ran (``method``, default this localizer's; when
        there is one), then ``cov_scale``.
        """
        cov = np.asarray(cov_en, dtype=float)
        model = self.cov_model if method in (None, self.method) or not self.calibration \
            else self.calibration.model_for(method)
        if model is not None:
            cov = model.apply(cov, confidence)
        return cov * self.cov_scale

    @property
    def heading_input(self):
        """Whether the model takes the camera heading."""
        return bool(getattr(self.backend.config, 'heading_input', False))

    @property
    def uses_heading(self):
        """Whether a camera heading changes the search.

        True when the model takes one, or when the fused search compares the frame with
        heading-aligned crops (without a heading it uses the north-up ones).
        """
        return self.heading_input or (self.retrieval is not None
                                      and self.bundle.retrieval_heading is not None)

    def search(self, g, prior=None, evidence=None):
        """Search the cell tree with a ground token ``g`` ``[D]``; return a SearchResult.

        ``evidence``: the frame's retrieval evidence (method 'zoom-fused';
        :meth:`retrieval_evidence`).
        """
        return search(self.backend, self.bundle, g, self.method, self.beam_width, prior=prior,
                      residual=self.residual_cov, shortlist=self.shortlist,
                      max_roots=self.max_roots, evidence=evidence,
                      zoom_weight=self.zoom_weight)

    def retrieval_evidence(self, image_rgb, heading_deg=None):
        """Return the fused search's evidence for a frame, or None.

        None for the other methods, and for a frame without a heading when the bundle's crops
        are heading-aligned: that frame runs the zoom beam alone (see
        :func:`~geozoom_ros.search.evidence_usable`), without the retrieval encoder's pass.
        """
        if self.retrieval is None or not evidence_usable(self.bundle, heading_deg):
            return None
        e = self.retrieval.embed_ground([image_rgb])[0]
        return retrieval_evidence(self.bundle, e, self.retrieval_scale, heading_deg)

    def localize(self, image_rgb, heading_deg=None, prior=None):
        """Localise one frame; return a :class:`Fix`, or None when no cell can be reached.

        Args:
            image_rgb: uint8 RGB array ``[H, W, 3]``.
            heading_deg: camera heading, degrees clockwise from north, or None. Used when the
                model takes a heading; None runs such a model in its heading-free mode.
            prior: None, a :class:`~geozoom_ros.search.Prior`, or ``(lat, lon, sigma_m)`` /
                ``(lat, lon, 2x2 covariance m^2)``: restricts the search to its 3-sigma region.

        Raises InputError for a bad image, heading or prior (one line).
        """
        t0 = time.perf_counter()
        check_images([image_rgb])
        headings = None
        if heading_deg is not None:
            try:
                heading_deg = float(heading_deg)
            except (TypeError, ValueError):
                raise InputError(f'heading {heading_deg!r} is not a number of degrees') from None
            if not math.isfinite(heading_deg):
                raise InputError(f'heading {heading_deg} is not finite; pass degrees '
                                 'clockwise from north or None')
            headings = [heading_deg % 360.0]
        prior = Prior.coerce(prior)
        g = self.backend.encode_ground([image_rgb], headings=headings)
        evidence = self.retrieval_evidence(image_rgb, heading_deg)
        t1 = time.perf_counter()
        result = self.search(g[0], prior=prior, evidence=evidence)
        t2 = time.perf_counter()
        if result is None:
            return None
        latency = {'encoder': (t1 - t0) * 1e3, 'search': (t2 - t1) * 1e3,
                   'total': (t2 - t0) * 1e3}
        return Fix(result.estimate[0], result.estimate[1],
                   self.fix_covariance(result.cov_en, result.confidence,
                                       result.info.get('method')),
                   result.confidence, result.cell, result.hypotheses, latency,
                   result.info.get('method', self.method))
