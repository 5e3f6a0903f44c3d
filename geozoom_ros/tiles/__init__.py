"""Offline tile pyramids: MBTiles / XYZ stores, cell views and the GeoTIFF builder."""
