"""The synthetic cross-view world: city model, renderers, dataset and drive bag.

- ``city``: the procedural city (roads, blocks, buildings, trees, parks, water, plazas,
  landmarks) in the ENU frame of its centre, and its triangle meshes by chunk;
- ``styles``: seasons, shared colour palettes, lighting and the difficulty knobs;
- ``render_gl``: the moderngl/EGL renderer of ground, drone and panorama views and of the
  orthophoto (one context per process);
- ``ortho``: the georeferenced UTM orthophoto, written tile by tile;
- ``dataset``: camera poses, the train/val/test-same/test-cross splits, JPEGs, index.csv;
- ``make``: the `geozoom world make` pipeline; ``preview``: the contact sheet;
- ``drive``: the drive rosbag2.

Nothing here imports torch or rclpy; moderngl is imported only by the renderer.
"""
