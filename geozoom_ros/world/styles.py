"""Styles (seasons), shared colour palettes, lighting and the difficulty knobs of the world.

A *style* (summer, autumn, winter) sets every colour of the world: roofs, facades, vegetation,
ground, snow. Both the orthophoto and the ground views read their colours from the same palette
table, so a style changes both views consistently. Roof and facade colours come from small
shared palettes (``Knobs.palette_size`` entries each): many buildings share every colour, so no
colour identifies a place.

Colours are sRGB in 0..1. Angles are degrees: sun azimuth clockwise from north, elevation above
the horizon.
"""

from dataclasses import asdict, dataclass, fields, replace
import functools
import math

import numpy as np

from geozoom_ros.errors import ConfigError, InputError

STYLES = ('summer', 'autumn', 'winter')

# Palette table layout: the vertex colour index of the mesh is a slot in this table, so a new
# style or season only swaps the table, never the geometry.
ROOF0, N_ROOF = 0, 24
FACADE0, N_FACADE = 24, 24
FOLIAGE0, N_FOLIAGE = 48, 8
CONIFER0, N_CONIFER = 56, 4
GRASS, PARK, YARD, EARTH = 60, 61, 62, 63
ASPHALT, ASPHALT_DARK, SIDEWALK, PLAZA = 64, 65, 66, 67
PAINT_WHITE, PAINT_YELLOW, WATER, BARK, PARKING, FIELD = 68, 69, 70, 71, 72, 73
LANDMARK0, N_LANDMARK = 80, 16
PALETTE_SIZE = 96


def _hex(colours):
    return np.array([[int(c[i:i + 2], 16) / 255.0 for i in (1, 3, 5)] for c in colours],
                    dtype=np.float32)


# Ordered by frequency in real cities: a small palette keeps the common colours.
_ROOFS = _hex([
    '#6e6e6e', '#8a8580', '#4f4f52', '#a45a3c', '#9c9890', '#5d4a42', '#b8b2a6', '#7a3b2e',
    '#5a6068', '#3b3b3b', '#c4a27a', '#6f7f6a', '#8f6b4e', '#a8a8a8', '#463a36', '#b36b4a',
    '#70757d', '#d0ccc2', '#59524a', '#8c4a3a', '#7d8a94', '#9a8c70', '#3f4a52', '#c08a5e'])
_FACADES = _hex([
    '#d8cfc0', '#bdb5a8', '#e6dfd0', '#a9a196', '#c98f6d', '#9b6a52', '#d9c391', '#8e8a84',
    '#efe9dc', '#b7a48a', '#c7b9a3', '#7d746c', '#d6a88a', '#a7afb4', '#c2c0b3', '#8f5b45',
    '#e0cda8', '#9ca39a', '#bfa58e', '#6c6a68', '#d1b9b0', '#b0c0c8', '#a48c6e', '#cfc9b8'])
_LANDMARKS = _hex([
    '#c0392b', '#f0f0f0', '#d4a017', '#2e8b7a', '#5b2c6f', '#e67e22', '#1f4e79', '#c9c1a0',
    '#8b1a1a', '#3c763d', '#b8860b', '#e8e0c8', '#4a4a4a', '#a0522d', '#6a8caf', '#dcdcdc'])

_SEASON = {
    'summer': dict(
        foliage=['#3f6b2a', '#4a7a30', '#35602a', '#557f35', '#2f5a25', '#4d6e2c', '#5c8a3a',
                 '#3a6630'],
        conifer=['#23402a', '#2a4a2e', '#1f3a26', '#2e5232'],
        grass='#6f9a45', park='#5f8f3d', yard='#7b9a55', earth='#8a7a5c', field='#8fa35a',
        asphalt='#4a4a4c', asphalt_dark='#3a3a3c', sidewalk='#a8a49c', plaza='#b9ad98',
        water='#3d6478', bark='#4b3a2a', parking='#5e5d5a', snow=0.0),
    'autumn': dict(
        foliage=['#b5651d', '#c98a2b', '#8f3b1b', '#d1a33a', '#7a5a22', '#a0441e', '#c07030',
                 '#6e6a2a'],
        conifer=['#2a3f28', '#30452c', '#243826', '#354a30'],
        grass='#8a8f4e', park='#7d8748', yard='#8e8a58', earth='#7d6a4c', field='#a08f5a',
        asphalt='#4c4b4a', asphalt_dark='#3c3b3a', sidewalk='#a39d92', plaza='#b0a28b',
        water='#3a5866', bark='#3f3024', parking='#5a5854', snow=0.0),
    'winter': dict(
        foliage=['#6d625a', '#75695e', '#5f5650', '#7c7168', '#665c55', '#83786e', '#5a524c',
                 '#70665e'],
        conifer=['#2c3d30', '#334536', '#28372c', '#3a4c3c'],
        grass='#e6e9ec', park='#dfe3e8', yard='#e2e5e8', earth='#d9dce0', field='#eceff2',
        asphalt='#55575a', asphalt_dark='#47494c', sidewalk='#c9ccd0', plaza='#d2d4d6',
        water='#9fb4c2', bark='#3a3430', parking='#8a8c8e', snow=0.75),
}

_SUN_ELEVATION = {'summer': (22.0, 65.0), 'autumn': (12.0, 45.0), 'winter': (7.0, 28.0)}
_ORTHO_SUN_ELEVATION = {'summer': 58.0, 'autumn': 40.0, 'winter': 24.0}


def check_style(style):
    """Return ``style`` if it is known; raise InputError naming the known styles otherwise."""
    if style not in STYLES:
        raise InputError(f'style {style!r} is unknown; use one of: {", ".join(STYLES)}')
    return style


def palette(style, snow_roofs=True):
    """Return the ``(PALETTE_SIZE, 3)`` float32 sRGB colour table of a style (season)."""
    s = _SEASON[check_style(style)]
    table = np.zeros((PALETTE_SIZE, 3), np.float32)
    roofs = _ROOFS.copy()
    if snow_roofs and s['snow'] > 0:
        # Snow lies on roofs: their colours converge, which is what makes winter hard.
        roofs = roofs * (1.0 - s['snow']) + np.float32([0.93, 0.94, 0.96]) * s['snow']
    table[ROOF0:ROOF0 + N_ROOF] = roofs
    table[FACADE0:FACADE0 + N_FACADE] = _FACADES
    table[FOLIAGE0:FOLIAGE0 + N_FOLIAGE] = _hex(s['foliage'])
    table[CONIFER0:CONIFER0 + N_CONIFER] = _hex(s['conifer'])
    for slot, key in ((GRASS, 'grass'), (PARK, 'park'), (YARD, 'yard'), (EARTH, 'earth'),
                      (ASPHALT, 'asphalt'), (ASPHALT_DARK, 'asphalt_dark'),
                      (SIDEWALK, 'sidewalk'), (PLAZA, 'plaza'), (WATER, 'water'),
                      (BARK, 'bark'), (PARKING, 'parking'), (FIELD, 'field')):
        table[slot] = _hex([s[key]])[0]
    table[PAINT_WHITE] = (0.9, 0.9, 0.88)
    table[PAINT_YELLOW] = (0.85, 0.7, 0.2)
    table[LANDMARK0:LANDMARK0 + N_LANDMARK] = _LANDMARKS
    return table


def is_snowy(style):
    """Return True when the style covers the ground with snow."""
    return _SEASON[check_style(style)]['snow'] > 0


# --------------------------------------------------------------------------------------------
# Difficulty knobs

@dataclass(frozen=True)
class Knobs:
    """Difficulty knobs of a world (strict: unknown keys are errors).

    palette_size: roof and facade colours in use (each, 2..24); smaller is harder.
    n_landmarks: distinctive landmarks (towers, domes, spires); fewer is harder.
    sun_mismatch: 0 = ground views lit like the orthophoto, 1 = independent random sun/time.
    season_mismatch: probability that a ground view shows a neighbouring season's colours.
    overcast_prob: probability of a ground view under an overcast sky (no cast shadows).
    fov_deg: (min, max) horizontal field of view of ground views, degrees.
    height_m: (min, max) camera height above the ground, metres.
    pitch_jitter_deg, roll_jitter_deg: standard deviations of the camera tilt, degrees.
    camera_effects: strength of noise, blur, exposure and white-balance changes (0 = off).
    tree_density: multiplier on the number of trees.
    ortho_m_per_px: ground resolution of the orthophoto, metres per pixel (0.3..0.5).
    block_m, margin_m, cross_fraction: test-cross blocks: side (m), the margin without
        train/val views around them (m), and the fraction of the area they cover.
    """

    palette_size: int = 10
    n_landmarks: int = 3
    sun_mismatch: float = 1.0
    season_mismatch: float = 0.1
    overcast_prob: float = 0.15
    fov_deg: tuple = (60.0, 100.0)
    height_m: tuple = (1.4, 2.5)
    pitch_jitter_deg: float = 3.0
    roll_jitter_deg: float = 1.5
    camera_effects: float = 1.0
    tree_density: float = 1.0
    ortho_m_per_px: float = 0.4
    block_m: float = 250.0
    margin_m: float = 50.0
    cross_fraction: float = 0.2

    def validate(self):
        """Return self; raise ConfigError naming the first knob that is out of range."""
        def bad(name, why):
            raise ConfigError(f'world knob {name}={getattr(self, name)!r}: {why}')
        if not 2 <= int(self.palette_size) <= N_ROOF:
            bad('palette_size', f'must be within 2..{N_ROOF}')
        if not 0 <= int(self.n_landmarks) <= 16:
            bad('n_landmarks', 'must be within 0..16')
        for name in ('sun_mismatch', 'season_mismatch', 'overcast_prob'):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                bad(name, 'must be within 0..1')
        lo, hi = self.fov_deg
        if not 20.0 <= lo <= hi <= 150.0:
            bad('fov_deg', 'must be (min, max) with 20 <= min <= max <= 150 degrees')
        lo, hi = self.height_m
        if not 0.5 <= lo <= hi <= 10.0:
            bad('height_m', 'must be (min, max) with 0.5 <= min <= max <= 10 metres')
        if not 0.3 <= float(self.ortho_m_per_px) <= 0.5:
            bad('ortho_m_per_px', 'must be within 0.3..0.5 metres per pixel')
        if not 0.0 <= float(self.camera_effects) <= 3.0:
            bad('camera_effects', 'must be within 0..3')
        if not 0.0 <= float(self.tree_density) <= 4.0:
            bad('tree_density', 'must be within 0..4')
        if not 50.0 <= float(self.block_m) <= 5000.0:
            bad('block_m', 'must be within 50..5000 metres')
        if not 0.0 <= float(self.margin_m) <= float(self.block_m):
            bad('margin_m', 'must be within 0..block_m metres')
        if not 0.0 <= float(self.cross_fraction) <= 0.5:
            bad('cross_fraction', 'must be within 0..0.5')
        for name in ('pitch_jitter_deg', 'roll_jitter_deg'):
            if not 0.0 <= float(getattr(self, name)) <= 30.0:
                bad(name, 'must be within 0..30 degrees')
        return self

    def to_dict(self):
        """Return the knobs as a JSON-friendly dict."""
        d = asdict(self)
        d['fov_deg'] = list(self.fov_deg)
        d['height_m'] = list(self.height_m)
        return d


DIFFICULTY = {
    'easy': dict(palette_size=20, n_landmarks=8, sun_mismatch=0.0, season_mismatch=0.0,
                 overcast_prob=0.0, fov_deg=(90.0, 100.0), camera_effects=0.3,
                 pitch_jitter_deg=1.0, roll_jitter_deg=0.5),
    'default': {},
    'hard': dict(palette_size=5, n_landmarks=1, sun_mismatch=1.0, season_mismatch=0.3,
                 overcast_prob=0.3, fov_deg=(60.0, 100.0), camera_effects=1.6,
                 pitch_jitter_deg=5.0, roll_jitter_deg=3.0),
}


def make_knobs(knobs=None, difficulty='default'):
    """Return validated :class:`Knobs` from a difficulty preset and overrides.

    ``knobs`` may be None, a :class:`Knobs` or a dict of field names; unknown names raise
    ConfigError.
    """
    if difficulty not in DIFFICULTY:
        raise InputError(f'difficulty {difficulty!r} is unknown; use one of: '
                         f'{", ".join(DIFFICULTY)}')
    base = Knobs(**DIFFICULTY[difficulty])
    if knobs is None:
        return base.validate()
    if isinstance(knobs, Knobs):
        return knobs.validate()
    names = {f.name for f in fields(Knobs)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise ConfigError(f'unknown world knob(s) {", ".join(unknown)}; known: '
                          f'{", ".join(sorted(names))}')
    values = dict(knobs)
    for key in ('fov_deg', 'height_m'):
        if key in values:
            values[key] = tuple(float(v) for v in values[key])
    try:
        return replace(base, **values).validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'world knobs: {exc}') from None


# --------------------------------------------------------------------------------------------
# Lighting

@dataclass(frozen=True)
class Lighting:
    """Sun, sky and exposure of one rendering.

    sun_azimuth_deg: clockwise from north (degrees); sun_elevation_deg: above the horizon.
    sun_strength, ambient: direct and diffuse light (0..1.5). visibility_m: haze distance
    (metres) of ground views. season: colour table to use (None = the world's style), so a
    ground view can differ in season from the orthophoto.
    """

    sun_azimuth_deg: float = 160.0
    sun_elevation_deg: float = 50.0
    sun_strength: float = 0.85
    ambient: float = 0.42
    sun_rgb: tuple = (1.0, 0.97, 0.9)
    sky_rgb: tuple = (0.85, 0.9, 1.0)
    zenith_rgb: tuple = (0.38, 0.56, 0.85)
    horizon_rgb: tuple = (0.78, 0.84, 0.9)
    visibility_m: float = 1800.0
    clouds: float = 0.3
    shadows: bool = True
    exposure: float = 1.0
    season: str = None

    def sun_vector(self):
        """Return the unit vector towards the sun in ENU (x east, y north, z up)."""
        az = math.radians(self.sun_azimuth_deg)
        el = math.radians(self.sun_elevation_deg)
        return np.array([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el),
                         math.sin(el)], np.float32)

    def to_dict(self):
        """Return the lighting as a JSON-friendly dict."""
        return asdict(self)


def auto_exposure(light):
    """Return the exposure that a camera's metering gives: flat ground as bright as at noon."""
    flat = light.ambient + light.sun_strength * math.sin(math.radians(light.sun_elevation_deg))
    return float(np.clip(_REFERENCE_IRRADIANCE / max(flat, 1e-3), 0.7, 1.45))


_REFERENCE_IRRADIANCE = 0.45 + 0.8 * math.sin(math.radians(58.0))


def ortho_lighting(style, lat=45.0):
    """Return the fixed lighting of a style's orthophoto (a clear late-morning sun)."""
    check_style(style)
    az = 150.0 if lat >= 0 else 30.0
    light = Lighting(sun_azimuth_deg=az, sun_elevation_deg=_ORTHO_SUN_ELEVATION[style],
                     sun_strength=0.8, ambient=0.45, clouds=0.0, visibility_m=1e6)
    return replace(light, exposure=auto_exposure(light))


_NEIGHBOUR_SEASON = {'summer': 'autumn', 'autumn': 'winter', 'winter': 'autumn'}


def sample_lighting(style, rng, knobs=None, lat=45.0):
    """Draw the lighting of one ground view (time of day, weather, season mismatch)."""
    knobs = knobs or Knobs()
    base = ortho_lighting(style, lat)
    if rng.random() >= knobs.sun_mismatch:
        light = replace(base, visibility_m=2000.0, clouds=0.2)
    else:
        lo, hi = _SUN_ELEVATION[style]
        el = float(rng.uniform(lo, hi))
        south = 180.0 if lat >= 0 else 0.0
        az = float((south + rng.uniform(-95.0, 95.0)) % 360.0)
        warm = max(0.0, 1.0 - el / 25.0)  # low sun is warmer and dimmer
        sun_rgb = (1.0, 0.95 - 0.12 * warm, 0.88 - 0.3 * warm)
        light = Lighting(sun_azimuth_deg=az, sun_elevation_deg=el,
                         sun_strength=float(rng.uniform(0.7, 0.95)),
                         ambient=float(rng.uniform(0.36, 0.5)), sun_rgb=sun_rgb,
                         visibility_m=float(rng.uniform(900.0, 3000.0)),
                         clouds=float(rng.uniform(0.0, 0.6)))
    if rng.random() < knobs.overcast_prob:
        grey = float(rng.uniform(0.72, 0.85))
        light = replace(light, sun_strength=0.12, ambient=float(rng.uniform(0.7, 0.85)),
                        shadows=False, zenith_rgb=(grey - 0.05, grey, grey + 0.03),
                        horizon_rgb=(grey + 0.05,) * 3, sky_rgb=(0.95, 0.95, 0.97),
                        clouds=1.0, visibility_m=float(rng.uniform(500.0, 1500.0)))
    if rng.random() < knobs.season_mismatch:
        light = replace(light, season=_NEIGHBOUR_SEASON[style])
    return replace(light, exposure=auto_exposure(light) * float(np.exp(rng.normal(0.0, 0.12))))


# --------------------------------------------------------------------------------------------
# Camera effects

@functools.lru_cache(maxsize=8)
def _radius2(h, w):
    """Squared normalised distance from the image centre, ``[h, w]`` float32 (read-only)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    r2.setflags(write=False)
    return r2


def camera_effects(image, rng, strength=1.0):
    """Return a copy of an RGB uint8 image with sensor-like changes.

    Exposure and white-balance shifts, gamma, optical or motion blur, vignetting and noise,
    drawn from ``rng``; ``strength`` 0 returns the image unchanged.
    """
    if strength <= 0:
        return image.copy()
    import cv2
    h, w = image.shape[:2]
    gain = float(np.exp(rng.normal(0.0, 0.14 * strength)))
    wb = 1.0 + rng.normal(0.0, 0.035 * strength, size=3)
    gamma = float(np.exp(rng.normal(0.0, 0.08 * strength)))
    # Exposure, white balance and gamma act per channel on 8-bit values: one lookup table.
    levels = np.arange(256, dtype=np.float64)[:, None] / 255.0
    lut = (np.clip(levels * gain * wb[None, :], 0.0, 1.0) ** gamma).astype(np.float32)
    img = cv2.LUT(np.ascontiguousarray(image), lut.reshape(256, 1, 3))
    u = rng.random()
    if u < 0.45:
        sigma = float(rng.uniform(0.3, 1.0 * strength + 0.3)) * w / 512.0
        if sigma > 0.25:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
    elif u < 0.6:
        n = max(3, int(round(rng.uniform(3, 3 + 6 * strength) * w / 512.0)) | 1)
        kernel = np.zeros((n, n), np.float32)
        kernel[n // 2, :] = 1.0 / n
        rot = cv2.getRotationMatrix2D((n / 2 - 0.5, n / 2 - 0.5), float(rng.uniform(0, 180)), 1)
        kernel = cv2.warpAffine(kernel, rot, (n, n))
        kernel /= max(kernel.sum(), 1e-6)
        img = cv2.filter2D(img, -1, kernel)
    vig = 1.0 - float(rng.uniform(0.0, 0.18 * strength)) / 2.0 * _radius2(h, w)
    img *= vig[..., None]
    sigma_n = float(rng.uniform(0.003, 0.02 * strength))
    # OpenCV's generator, seeded from ``rng``, draws the noise several times faster.
    cv2.setRNGSeed(int(rng.integers(0, 2 ** 31 - 1)))
    noise = np.empty_like(img)
    cv2.randn(noise, 0.0, sigma_n)
    img += noise
    np.clip(img, 0.0, 1.0, out=img)
    return cv2.convertScaleAbs(img, alpha=255.0)
