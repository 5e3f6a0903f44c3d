"""Camera frames for drive-bag tests: a deterministic picture of position and heading."""

import numpy as np


def pattern_frame(east, north, heading_deg, pitch_deg=0.0, roll_deg=0.0, size=(32, 24)):
    """Return a ``size`` (width, height) RGB picture of position (metres) and heading (degrees).

    Has the signature of a drive renderer (``write_drive_bag_for_roads``'s ``render``; bind
    another ``size`` with functools.partial). The gradients span the same range at any size.
    """
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (xx * (256 // w) + int(east * 3)) % 256
    img[..., 1] = (yy * (240 // h) + int(north * 3)) % 256
    img[..., 2] = int(heading_deg / 360 * 255) % 256
    return img
