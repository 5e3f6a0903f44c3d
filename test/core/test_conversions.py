"""Image message conversions against reference decodes (OpenCV), for every encoding."""

import array
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from rosbags.typesys import get_typestore, Stores

from geozoom_ros.errors import InputError
from geozoom_ros.ros.conversions import (compressed_msg_to_rgb, ConversionError,
                                         image_msg_to_rgb, msg_to_rgb, rgb_to_compressed_fields,
                                         rgb_to_image_msg_fields, SUPPORTED_ENCODINGS)

TS = get_typestore(Stores.ROS2_KILTED)
H, W = 6, 10


def _rgb(h=H, w=W, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_rgb(h=16, w=24):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 4 % 256], axis=2)
    return img.astype(np.uint8)


def _padded(pixels_rows, pad):
    """Return the bytes of (H, row_bytes) rows, each followed by ``pad`` bytes of 0xAB."""
    rows = np.asarray(pixels_rows, dtype=np.uint8)
    filler = np.full((rows.shape[0], pad), 0xAB, np.uint8)
    return np.concatenate([rows, filler], axis=1).reshape(-1), rows.shape[1] + pad


def _msg(encoding, pixels, pad=0, big=False, data_as='numpy'):
    """Build an Image-like message (rclpy-style array.array or rosbags-style numpy data)."""
    pixels = np.asarray(pixels)
    h, w = pixels.shape[:2]
    if pixels.dtype == np.uint16:
        pixels = pixels.astype('>u2' if big else '<u2')
    raw = np.frombuffer(np.ascontiguousarray(pixels).tobytes(), np.uint8).reshape(h, -1)
    data, step = _padded(raw, pad)
    if data_as == 'array':
        data = array.array('B', data.tobytes())
    elif data_as == 'bytes':
        data = data.tobytes()
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(big),
                           step=step, data=data)


@pytest.mark.parametrize('data_as', ['numpy', 'array', 'bytes'])
@pytest.mark.parametrize('pad', [0, 6])
def test_rgb8_exact_with_and_without_row_padding(pad, data_as):
    rgb = _rgb()
    out = image_msg_to_rgb(_msg('rgb8', rgb, pad=pad, data_as=data_as))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding,code', [
    ('bgr8', cv2.COLOR_BGR2RGB), ('8UC3', cv2.COLOR_BGR2RGB),
    ('rgba8', cv2.COLOR_RGBA2RGB), ('bgra8', cv2.COLOR_BGRA2RGB), ('8UC4', cv2.COLOR_BGRA2RGB),
    ('mono8', cv2.COLOR_GRAY2RGB), ('8UC1', cv2.COLOR_GRAY2RGB),
])
def test_8bit_encodings_match_opencv_reference_with_padding(encoding, code):
    channels = {'bgr8': 3, '8UC3': 3, 'rgba8': 4, 'bgra8': 4, '8UC4': 4}.get(encoding, 1)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (H, W, channels), dtype=np.uint8)
    ref = cv2.cvtColor(pixels if channels > 1 else pixels[:, :, 0], code)
    for pad in (0, 3, 8):
        out = image_msg_to_rgb(_msg(encoding, pixels, pad=pad))
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize('encoding', ['mono16', '16UC1'])
@pytest.mark.parametrize('big', [False, True])
def test_16bit_grey_is_scaled_to_8bit(encoding, big):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    pixels[0, :3] = [0, 65535, 257 * 100]
    ref = cv2.cvtColor(cv2.convertScaleAbs(pixels, alpha=255.0 / 65535.0), cv2.COLOR_GRAY2RGB)
    out = image_msg_to_rgb(_msg(encoding, pixels, pad=4, big=big))
    # OpenCV rounds half to even, the converter half up: at most one grey level apart.
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    np.testing.assert_array_equal(out[0, :3, 0], [0, 255, 100])


@pytest.mark.parametrize('encoding,channels,order', [
    ('rgb16', 3, [0, 1, 2]), ('bgr16', 3, [2, 1, 0]), ('rgba16', 4, [0, 1, 2]),
    ('bgra16', 4, [2, 1, 0])])
def test_16bit_colour(encoding, channels, order):
    rgb8 = _rgb(seed=3)
    pixels16 = rgb8.astype(np.uint16) * 257
    if channels == 4:
        pixels16 = np.concatenate([pixels16, np.full((H, W, 1), 65535, np.uint16)], axis=2)
    pixels16 = pixels16[:, :, order + ([3] if channels == 4 else [])]
    out = image_msg_to_rgb(_msg(encoding, pixels16, pad=2))
    np.testing.assert_array_equal(out, rgb8)


def _rgb_to_yuv422(rgb, order):
    """Encode RGB as packed 4:2:2 with BT.601 studio-swing, the way cameras send it."""
    rgbf = rgb.astype(np.float64)
    r, g, b = rgbf[..., 0], rgbf[..., 1], rgbf[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    u2 = (u[:, 0::2] + u[:, 1::2]) / 2
    v2 = (v[:, 0::2] + v[:, 1::2]) / 2
    h, w = rgb.shape[:2]
    out = np.empty((h, w // 2, 4))
    if order == 'uyvy':
        out[..., 0], out[..., 1], out[..., 2], out[..., 3] = u2, y[:, 0::2], v2, y[:, 1::2]
    else:
        out[..., 0], out[..., 1], out[..., 2], out[..., 3] = y[:, 0::2], u2, y[:, 1::2], v2
    return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(h, w, 2)


@pytest.mark.parametrize('encoding,order,code', [
    ('yuv422', 'uyvy', cv2.COLOR_YUV2RGB_UYVY), ('uyvy', 'uyvy', cv2.COLOR_YUV2RGB_UYVY),
    ('yuv422_yuy2', 'yuyv', cv2.COLOR_YUV2RGB_YUYV), ('yuyv', 'yuyv', cv2.COLOR_YUV2RGB_YUYV)])
def test_yuv422_matches_opencv_and_the_source_colours(encoding, order, code):
    rgb = _smooth_rgb()
    packed = _rgb_to_yuv422(rgb, order)
    ref = cv2.cvtColor(packed, code)
    out = image_msg_to_rgb(_msg(encoding, packed, pad=12))
    np.testing.assert_array_equal(out, ref)
    # Chroma is shared by pixel pairs, so only roughly the source colours.
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6.0
    other = 'yuyv' if order == 'uyvy' else 'uyvy'
    wrong = image_msg_to_rgb(_msg(other, packed))
    assert np.abs(wrong.astype(int) - rgb.astype(int)).mean() > 20.0


def test_rosbags_message_and_encoding_case():
    rgb = _rgb(seed=4)
    fields = rgb_to_image_msg_fields(rgb, 'bgr8')
    hdr = TS.types['std_msgs/msg/Header'](
        stamp=TS.types['builtin_interfaces/msg/Time'](sec=1, nanosec=2), frame_id='cam')
    msg = TS.types['sensor_msgs/msg/Image'](header=hdr, **fields)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)
    np.testing.assert_array_equal(msg_to_rgb(msg), rgb)
    msg.encoding = 'BGR8'
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)
    # CDR round trip through rosbags keeps it decodable.
    back = TS.deserialize_cdr(TS.serialize_cdr(msg, 'sensor_msgs/msg/Image'),
                              'sensor_msgs/msg/Image')
    np.testing.assert_array_equal(image_msg_to_rgb(back), rgb)


def test_result_does_not_alias_message_data():
    rgb = _rgb()
    msg = _msg('rgb8', rgb)
    out = image_msg_to_rgb(msg)
    out[:] = 0
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def test_missing_last_row_padding_is_accepted():
    rgb = _rgb()
    msg = _msg('rgb8', rgb, pad=5)
    msg.data = msg.data[:-5]
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def test_every_supported_encoding_decodes():
    for enc in SUPPORTED_ENCODINGS:
        bpp = {'rgb16': 6, 'bgr16': 6, 'rgba16': 8, 'bgra16': 8, 'rgba8': 4, 'bgra8': 4,
               '8uc4': 4, 'rgb8': 3, 'bgr8': 3, '8uc3': 3, 'mono16': 2, '16uc1': 2,
               'yuv422': 2, 'uyvy': 2, 'yuv422_yuy2': 2, 'yuyv': 2}.get(enc, 1)
        msg = SimpleNamespace(height=2, width=4, encoding=enc, is_bigendian=0, step=4 * bpp,
                              data=bytes(range(8 * bpp)))
        out = image_msg_to_rgb(msg)
        assert out.shape == (2, 4, 3) and out.dtype == np.uint8, enc


@pytest.mark.parametrize('quality', [95, 60])
def test_jpeg_matches_imdecode(quality):
    rgb = _smooth_rgb(48, 64)
    fields = rgb_to_compressed_fields(rgb, 'jpeg', quality=quality)
    assert fields['format'] == 'rgb8; jpeg compressed bgr8'
    ref = cv2.cvtColor(cv2.imdecode(fields['data'], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    msg = SimpleNamespace(format=fields['format'], data=array.array('B', fields['data']))
    out = compressed_msg_to_rgb(msg)
    np.testing.assert_array_equal(out, ref)
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6.0
    np.testing.assert_array_equal(msg_to_rgb(msg), ref)


def test_png_is_lossless_and_format_string_is_not_trusted():
    rgb = _rgb(20, 30, seed=5)
    fields = rgb_to_compressed_fields(rgb, 'png')
    msg = TS.types['sensor_msgs/msg/CompressedImage'](
        header=TS.types['std_msgs/msg/Header'](
            stamp=TS.types['builtin_interfaces/msg/Time'](sec=0, nanosec=0), frame_id=''),
        format='jpeg', data=fields['data'])
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg), rgb)


def test_grey_png_becomes_three_channels():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    ok, enc = cv2.imencode('.png', grey)
    out = compressed_msg_to_rgb(SimpleNamespace(format='mono8; png compressed', data=enc))
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))


def _one_line_error(fn, msg):
    with pytest.raises(ConversionError) as info:
        fn(msg)
    text = str(info.value)
    assert text and '\n' not in text
    assert isinstance(info.value, InputError)
    return text


@pytest.mark.parametrize('change,needle', [
    (dict(encoding='bayer_rggb8'), 'not supported'),
    (dict(encoding='32FC1'), 'not supported'),
    (dict(width=0, step=0, data=b''), 'empty'),
    (dict(height=0), 'empty'),
    (dict(step=W * 3 - 1), 'smaller than width'),
    (dict(data=bytes(H * W * 3 - 1)), 'too short'),
    (dict(data=None), 'missing'),
])
def test_bad_raw_images_give_one_line(change, needle):
    msg = _msg('rgb8', _rgb())
    for k, v in change.items():
        setattr(msg, k, v)
    assert needle in _one_line_error(image_msg_to_rgb, msg)


def test_odd_width_yuv_and_non_image():
    msg = SimpleNamespace(height=2, width=3, encoding='yuv422', is_bigendian=0, step=6,
                          data=bytes(12))
    assert 'odd' in _one_line_error(image_msg_to_rgb, msg)
    assert 'not an image' in _one_line_error(image_msg_to_rgb, SimpleNamespace(format='x'))


def test_bad_compressed_images_give_one_line():
    jpeg = rgb_to_compressed_fields(_smooth_rgb(32, 32), 'jpeg')['data'].tobytes()
    png = rgb_to_compressed_fields(_smooth_rgb(32, 32), 'png')['data'].tobytes()
    cases = [
        (b'', 'no data'),
        (jpeg[:len(jpeg) // 2], 'truncated JPEG'),
        (b'\xff\xd8' + bytes(200) + b'\xff\xd9', 'corrupt JPEG'),
        (png[:40], 'corrupt PNG'),
        (b'GIF89a' + bytes(50), 'neither JPEG nor PNG'),
    ]
    for data, needle in cases:
        text = _one_line_error(compressed_msg_to_rgb, SimpleNamespace(format='jpeg', data=data))
        assert needle in text, (needle, text)
    depth = SimpleNamespace(format='16UC1; compressedDepth png', data=png)
    assert 'depth' in _one_line_error(compressed_msg_to_rgb, depth)


def test_writer_helpers_reject_bad_arrays():
    with pytest.raises(ConversionError):
        rgb_to_image_msg_fields(np.zeros((4, 4), np.uint8))
    with pytest.raises(ConversionError):
        rgb_to_image_msg_fields(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ConversionError):
        rgb_to_image_msg_fields(np.zeros((4, 4, 3), np.uint8), 'mono8')
    with pytest.raises(ConversionError):
        rgb_to_compressed_fields(np.zeros((4, 4, 3), np.uint8), 'webp')
    with pytest.raises(ConversionError):
        rgb_to_compressed_fields(np.zeros((0, 4, 3), np.uint8))
