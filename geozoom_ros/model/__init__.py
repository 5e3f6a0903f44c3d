"""The zoom policy and the retrieval baseline (torch).

- :mod:`geozoom_ros.model.config`: ``PolicyConfig`` (architecture, cell geometry),
  ``TrainConfig`` and ``load_preset`` (``config/train/*.yaml``); strict, no torch.
- :mod:`geozoom_ros.model.policy`: ``ZoomPolicy`` (``encode_ground``, ``encode_map``,
  ``forward``, ``step_logits``, ``preprocess_ground``, ``preprocess_map``).
- :mod:`geozoom_ros.model.retrieval`: ``RetrievalModel`` (``embed_ground``, ``embed_map``).
- :mod:`geozoom_ros.model.io`: ``save_model``, ``load_model``, ``model_hash``.

Importing this package imports nothing heavy; the submodules import torch.
"""
