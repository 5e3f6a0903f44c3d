"""Image message <-> numpy conversions that honour ``encoding`` and ``step``.

Works on message objects from rclpy or rosbags alike by duck typing: a raw image has
``height``, ``width``, ``encoding``, ``step``, ``data`` (and optionally ``is_bigendian``); a
compressed image has ``format`` and ``data``. ``data`` may be ``bytes``, ``bytearray``,
``array.array('B')`` (rclpy), a numpy ``uint8`` array (rosbags) or a list of ints.

Every decoder returns an ``(H, W, 3)`` ``uint8`` RGB array (pixels, row 0 at the top). Bad
input raises :class:`ConversionError` with one line saying what is wrong; this module imports
neither rclpy nor cv_bridge.

Supported raw encodings (names as in ``sensor_msgs/image_encodings``):

============================  =========================================================
encoding                      decoded as
============================  =========================================================
rgb8, bgr8, rgba8, bgra8      8-bit colour; alpha dropped
rgb16, bgr16, rgba16, bgra16  16-bit colour, scaled to 8 bit (v * 255 / 65535, rounded)
mono8, 8UC1                   grey replicated to three channels
mono16, 16UC1                 16-bit grey scaled to 8 bit like rgb16
8UC3, 8UC4                    OpenCV's channel order: BGR / BGRA
yuv422, uyvy                  UYVY 4:2:2 (ROS's ``yuv422`` is UYVY), via cv2.cvtColor
yuv422_yuy2, yuyv             YUYV 4:2:2, via cv2.cvtColor
============================  =========================================================

16-bit data honour ``is_bigendian``.
"""

import cv2
import numpy as np

from geozoom_ros.errors import InputError


class ConversionError(InputError):
    """An image message cannot be decoded (unknown encoding, bad size, step or data)."""


# encoding -> (bytes per pixel, numpy element type, channels, kind). ``kind`` names the
# conversion to RGB applied after the pixels have been cut out of the padded rows.
_RAW = {
    'rgb8': (3, np.uint8, 3, 'rgb'),
    'bgr8': (3, np.uint8, 3, 'bgr'),
    'rgba8': (4, np.uint8, 4, 'rgba'),
    'bgra8': (4, np.uint8, 4, 'bgra'),
    'rgb16': (6, np.uint16, 3, 'rgb'),
    'bgr16': (6, np.uint16, 3, 'bgr'),
    'rgba16': (8, np.uint16, 4, 'rgba'),
    'bgra16': (8, np.uint16, 4, 'bgra'),
    'mono8': (1, np.uint8, 1, 'mono'),
    'mono16': (2, np.uint16, 1, 'mono'),
    '8uc1': (1, np.uint8, 1, 'mono'),
    '16uc1': (2, np.uint16, 1, 'mono'),
    '8uc3': (3, np.uint8, 3, 'bgr'),
    '8uc4': (4, np.uint8, 4, 'bgra'),
    'yuv422': (2, np.uint8, 2, 'uyvy'),
    'uyvy': (2, np.uint8, 2, 'uyvy'),
    'yuv422_yuy2': (2, np.uint8, 2, 'yuyv'),
    'yuyv': (2, np.uint8, 2, 'yuyv'),
}

#: Raw encodings :func:`image_msg_to_rgb` decodes (lower case; matching is case-insensitive).
SUPPORTED_ENCODINGS = tuple(sorted(_RAW))

_JPEG_SOI = b'\xff\xd8'
_JPEG_EOI = b'\xff\xd9'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _as_bytes_view(data, what):
    """Return ``data`` as a 1-D uint8 numpy array without copying where possible."""
    if data is None:
        raise ConversionError(f'{what}: data is missing')
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype.itemsize == 1 else \
            np.frombuffer(data.tobytes(), dtype=np.uint8)
    try:
        return np.frombuffer(memoryview(data).cast('B'), dtype=np.uint8)
    except TypeError:
        # Lists of ints (and other sequences without the buffer protocol).
        try:
            return np.asarray(data, dtype=np.uint8).reshape(-1)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConversionError(f'{what}: data is not a byte sequence ({exc})') from None


def _scale16(arr):
    """Scale 16-bit values to 8 bit over the full range (rounded)."""
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def image_msg_to_rgb(msg):
    """Decode a ``sensor_msgs/Image`` to an ``(H, W, 3)`` uint8 RGB array.

    Honours ``encoding`` (see the module docstring), ``step`` (bytes per row, which may include
    padding after the pixels) and ``is_bigendian`` for 16-bit data. The result never shares
    memory with the message. Raises :class:`ConversionError` for an unknown encoding, an empty
    image, an odd width with a 4:2:2 encoding, a step smaller than width x bytes-per-pixel, or
    data shorter than the image needs.
    """
    try:
        height, width = int(msg.height), int(msg.width)
        encoding = str(msg.encoding)
        step = int(msg.step)
        data = msg.data
    except AttributeError as exc:
        raise ConversionError(f'not an image message: {exc}') from None
    key = encoding.strip().lower()
    if key not in _RAW:
        raise ConversionError(
            f'image encoding {encoding!r} is not supported; use one of '
            f'{", ".join(SUPPORTED_ENCODINGS)} (or publish a CompressedImage)')
    bpp, dtype, channels, kind = _RAW[key]
    if height <= 0 or width <= 0:
        raise ConversionError(f'image is empty ({width}x{height} pixels)')
    if kind in ('uyvy', 'yuyv') and width % 2:
        raise ConversionError(f'image width {width} is odd; {encoding} (4:2:2) needs an even '
                              'width')
    row_bytes = width * bpp
    if step < row_bytes:
        raise ConversionError(f'image step {step} bytes is smaller than width {width} x '
                              f'{bpp} bytes per pixel = {row_bytes} ({encoding})')
    buf = _as_bytes_view(data, 'image')
    # The last row's padding may be missing in some drivers; the pixels must all be there.
    needed = step * (height - 1) + row_bytes
    if buf.size < needed:
        raise ConversionError(f'image data is {buf.size} bytes, too short for {width}x{height} '
                              f'{encoding} with step {step} (needs {needed})')
    if buf.size < step * height:
        buf = np.concatenate([buf, np.zeros(step * height - buf.size, np.uint8)])
    rows = buf[:step * height].reshape(height, step)[:, :row_bytes]
    if dtype is np.uint16:
        big = bool(getattr(msg, 'is_bigendian', False))
        pixels = np.ascontiguousarray(rows).view('>u2' if big else '<u2')
        pixels = _scale16(pixels.reshape(height, width, channels))
    else:
        pixels = np.ascontiguousarray(rows).reshape(height, width, channels)
    if kind == 'rgb':
        return pixels.copy()
    if kind == 'bgr':
        return np.ascontiguousarray(pixels[:, :, ::-1])
    if kind == 'rgba':
        return np.ascontiguousarray(pixels[:, :, :3])
    if kind == 'bgra':
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    if kind == 'mono':
        return np.repeat(pixels, 3, axis=2)
    code = cv2.COLOR_YUV2RGB_UYVY if kind == 'uyvy' else cv2.COLOR_YUV2RGB_YUYV
    return cv2.cvtColor(pixels, code)


def compressed_msg_to_rgb(msg):
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG or PNG) to ``(H, W, 3)`` uint8 RGB.

    The container is recognised from its magic bytes (``format`` is only used for the error
    message, since drivers fill it inconsistently). Raises :class:`ConversionError` for empty
    data, a ``compressedDepth`` image, an unknown container, or a corrupt or truncated file.
    """
    try:
        fmt = str(msg.format)
        data = msg.data
    except AttributeError as exc:
        raise ConversionError(f'not a compressed image message: {exc}') from None
    buf = _as_bytes_view(data, 'compressed image')
    if buf.size == 0:
        raise ConversionError(f'compressed image ({fmt!r}) has no data')
    if 'compresseddepth' in fmt.replace(' ', '').lower():
        raise ConversionError(f'compressed image format {fmt!r} (depth) is not supported; use '
                              'a colour JPEG or PNG stream')
    head = buf[:8].tobytes()
    if head.startswith(_JPEG_SOI):
        # libjpeg decodes a truncated stream into a half-grey picture without failing; the
        # end-of-image marker (possibly followed by zero padding) tells a whole file.
        tail = buf[-64:].tobytes().rstrip(b'\x00')
        if not tail.endswith(_JPEG_EOI):
            raise ConversionError(f'compressed image ({fmt!r}) is a truncated JPEG '
                                  f'({buf.size} bytes, no end-of-image marker)')
        kind = 'JPEG'
    elif head.startswith(_PNG_MAGIC):
        kind = 'PNG'
    else:
        raise ConversionError(f'compressed image format {fmt!r}: data is neither JPEG nor PNG '
                              f'(starts with {head[:4].hex()})')
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise ConversionError(f'compressed image ({fmt!r}) is a corrupt {kind} '
                              f'({buf.size} bytes)')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def msg_to_rgb(msg):
    """Decode either kind of image message (``format`` present -> compressed)."""
    if hasattr(msg, 'format') and not hasattr(msg, 'encoding'):
        return compressed_msg_to_rgb(msg)
    return image_msg_to_rgb(msg)


def _check_rgb(rgb):
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConversionError(f'expected an (H, W, 3) uint8 RGB array, got shape {rgb.shape} '
                              f'and dtype {rgb.dtype}')
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ConversionError(f'image is empty ({rgb.shape[1]}x{rgb.shape[0]} pixels)')
    return np.ascontiguousarray(rgb)


def rgb_to_image_msg_fields(rgb, encoding='rgb8'):
    """Return the fields of a ``sensor_msgs/Image`` holding an ``(H, W, 3)`` uint8 RGB array.

    ``encoding`` is ``'rgb8'`` or ``'bgr8'``. Returns a dict with ``height``, ``width``,
    ``encoding``, ``is_bigendian`` (0), ``step`` (bytes per row, unpadded) and ``data`` (a 1-D
    uint8 numpy array, as rosbags wants; rclpy messages accept ``data.tobytes()``).
    """
    rgb = _check_rgb(rgb)
    if encoding == 'rgb8':
        pixels = rgb
    elif encoding == 'bgr8':
        pixels = np.ascontiguousarray(rgb[:, :, ::-1])
    else:
        raise ConversionError(f'encoding {encoding!r} cannot be written; use rgb8 or bgr8')
    h, w = rgb.shape[:2]
    return {'height': h, 'width': w, 'encoding': encoding, 'is_bigendian': 0, 'step': w * 3,
            'data': pixels.reshape(-1).copy()}


def rgb_to_compressed_fields(rgb, fmt='jpeg', quality=90):
    """Return the fields of a ``sensor_msgs/CompressedImage`` holding an RGB array.

    ``fmt`` is ``'jpeg'`` (``quality`` 1-100) or ``'png'``. Returns a dict with ``format``
    (``'rgb8; jpeg compressed bgr8'`` style, as image_transport writes it) and ``data`` (a 1-D
    uint8 numpy array).
    """
    rgb = _check_rgb(rgb)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if fmt == 'jpeg':
        if not 1 <= int(quality) <= 100:
            raise ConversionError(f'JPEG quality {quality} is outside 1..100')
        ok, enc = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif fmt == 'png':
        ok, enc = cv2.imencode('.png', bgr)
    else:
        raise ConversionError(f'compressed format {fmt!r} cannot be written; use jpeg or png')
    if not ok:
        raise ConversionError(f'OpenCV could not encode a {rgb.shape[1]}x{rgb.shape[0]} {fmt}')
    return {'format': f'rgb8; {fmt} compressed bgr8', 'data': enc.reshape(-1)}
