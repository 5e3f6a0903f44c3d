"""Camera frames for drive-bag tests: a deterministic picture of position and heading."""

import numpy as np


def pattern_frame(east, north, heading_deg, pitch_deg=0.0, roll_deg=0.0):
    """Return a 32x24 RGB picture that depends on position (metres) and heading (degrees).

    Has the signature of a drive renderer (``write_drive_bag_for_roads``'s ``render``).
    """
    yy, xx = np.mgrid[0:24, 0:32]
    img = np.empty((24, 32, 3), np.uint8)
    img[..., 0] = (xx * 8 + int(east * 3)) % 256
    img[..., 1] = (yy * 10 + int(north * 3)) % 256
    img[..., 2] = int(heading_deg / 360 * 255) % 256
    return img
