"""The OpenGL renderer of the synthetic world: ground views, drone views, panoramas, orthophoto.

One headless EGL context per process (Mesa llvmpipe on a CPU); create the renderer after a
fork, never before. The city mesh is built lazily in square chunks (``chunk_m`` metres) that
are frustum-culled and kept in a bounded cache, so worlds of 10 km and more render in the
memory of a small one. The orthophoto is an orthographic top-down rendering of the same
meshes with the same palette, so what a ground camera sees at bearing b and distance d lies in
the orthophoto at that bearing and distance.

Anti-aliasing is supersampling (``supersample`` x the output size, box-filtered on the GPU);
llvmpipe's 4x multisampling measured slower than 2x supersampling on this kind of CPU. The
costs that matter on a CPU rasterizer are kept down by culling back faces, indexed meshes
(shared vertices shaded once), fragment shaders that carry only the code of the materials
they draw, and a sky shaded at the output size behind the scene.

Frames: ENU metres of the city (x east, y north, z up). Headings are degrees clockwise from
north, pitch is degrees above the horizon (negative looks down), roll degrees about the
optical axis. Images are RGB uint8, row 0 at the top.
"""

from collections import OrderedDict
import math

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.world import city as C
from geozoom_ros.world import styles as S

EGL_PACKAGES = 'libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri'

_VS = '''
#version 330
uniform mat4 mvp;
uniform mat4 light_mvp;
in vec3 in_pos; in vec3 in_nrm; in float in_mat; in float in_col; in vec2 in_uv;
in float in_tint; in float in_obj;
uniform sampler2D palette;
out vec3 v_pos; out vec3 v_nrm; out vec2 v_uv; out vec3 v_light; out vec2 v_ncoord;
flat out int v_mat; flat out vec3 v_base; flat out float v_tint; flat out float v_obj;
flat out float v_namp;
void main() {
    gl_Position = mvp * vec4(in_pos, 1.0);
    v_pos = in_pos; v_nrm = in_nrm; v_uv = in_uv;
    vec4 lc = light_mvp * vec4(in_pos + in_nrm * 0.08, 1.0);
    v_light = lc.xyz / lc.w * 0.5 + 0.5;
    v_mat = int(in_mat + 0.5); v_tint = in_tint; v_obj = in_obj;
    v_base = texelFetch(palette, ivec2(int(in_col + 0.5), 0), 0).rgb;
    // Each material's noise: its coordinates (linear in the position, so interpolation is
    // exact) and amplitude, set per vertex so that a fragment makes one texture fetch.
    int m = v_mat;
    vec2 nc = in_pos.xy * 0.5;
    float amp = 0.0;
    if (m == 8) { nc = in_pos.xy * 0.6; amp = 0.4; }
    else if (m == 1) { nc = in_pos.xy * 1.7; amp = 0.26; }
    else if (m == 10) { nc = in_pos.xy * 0.3; amp = 0.12; }
    else if (m == 2) { nc = in_pos.xy * 3.0; amp = 0.15; }
    else if (m == 7) { nc = in_pos.xy * vec2(0.6, 2.0); amp = 0.15; }
    else if (m == 3) { nc = in_pos.xy * 0.5; amp = 0.14; }
    else if (m == 4) { nc = in_uv * vec2(2.1, 0.9); amp = 0.06; }
    else if (m == 5) { nc = in_pos.xy * 1.2 + in_pos.z * 0.7; amp = 0.6; }
    else if (m == 9) { nc = in_pos.xy * 0.5 + in_pos.z; amp = 0.08; }
    v_ncoord = nc * (1.0 / 256.0);
    v_namp = amp;
}
'''

_FS = '''
#version 330
uniform sampler2DShadow shadow_map;
uniform sampler2D noise_tex;
uniform int use_shadow;
uniform int label_mode;
uniform int ground_view;
uniform vec3 sun_dir;
uniform vec3 sun_rgb;
uniform vec3 sky_rgb;
uniform vec3 haze_rgb;
uniform vec3 cam_pos;
uniform float sun_strength;
uniform float ambient;
uniform float visibility;
uniform float exposure;
in vec3 v_pos; in vec3 v_nrm; in vec2 v_uv; in vec3 v_light; in vec2 v_ncoord;
flat in int v_mat; flat in vec3 v_base; flat in float v_tint; flat in float v_obj;
flat in float v_namp;
out vec4 frag;

float hash(vec2 p) {
    p = mod(p, 1024.0);
    vec3 p3 = fract(vec3(p.xyx) * 0.1031);
    p3 += dot(p3, p3.yzx + 33.33);
    return fract((p3.x + p3.y) * p3.z);
}
void main() {
    if (label_mode == 1) {
        int id = int(v_obj + 0.5);
        frag = vec4(float(id & 255), float((id >> 8) & 255), float((id >> 16) & 255), 255.0)
               / 255.0;
        return;
    }
    vec3 base = v_base;
    vec3 n = normalize(v_nrm);
    vec2 p = v_pos.xy;
    float ao = 1.0;
    float wrap = 0.0;
    base *= 1.0 - 0.5 * v_namp + v_namp * texture(noise_tex, v_ncoord).r;
#ifndef BUILDINGS
    if (v_mat == 10) {           // paving joints
        vec2 g = fract(p * 0.8);
        base *= 1.0 - 0.07 * step(min(g.x, g.y), 0.05);
    } else if (v_mat == 7) {     // water mirrors the haze
        if (ground_view == 1) base = mix(base, haze_rgb, 0.35);
    } else if (v_mat == 5) {     // foliage: light wraps round the crown
        wrap = 0.35;
    }
#else
    if (v_mat == 3) {            // roofs
        base *= 0.93 + 0.14 * fract(v_tint * 7.31);
        if (abs(n.z) > 0.99 && hash(floor(p / 3.0) + floor(v_tint * 97.0)) > 0.95)
            base *= 0.72;        // roof fixtures
    } else if (v_mat == 4) {     // facades with windows
        base *= 0.92 + 0.16 * fract(v_tint * 7.31);
        float bay = 2.4 + 1.8 * fract(v_tint * 3.17);
        float fh = 3.1 + 0.3 * fract(v_tint * 5.3);
        vec2 c = v_uv / vec2(bay, fh);
        vec2 f = fract(c);
        float h = hash(floor(c));
        float wx = 0.18 + 0.12 * fract(v_tint * 11.7);
        float win = step(wx, f.x) * step(f.x, 1.0 - wx) * step(0.3, f.y) * step(f.y, 0.82);
        if (c.y < 1.0) win = step(0.08, f.x) * step(f.x, 0.92) * step(0.05, f.y)
                             * step(f.y, 0.72) * step(0.5, fract(h * 7.0));
        vec3 glass = mix(vec3(0.12, 0.15, 0.19), sky_rgb * 0.6, 0.3 + 0.3 * h);
        base = mix(base, glass, win);
        ao = 0.72 + 0.28 * smoothstep(0.0, 5.0, v_uv.y);
    }
#endif
    float ndl = max((dot(n, sun_dir) + wrap) / (1.0 + wrap), 0.0);
    float lit = 1.0;
    if (use_shadow == 1 && ndl > 0.0) {
        vec3 q = v_light;
        if (q.x > 0.0 && q.x < 1.0 && q.y > 0.0 && q.y < 1.0 && q.z < 1.0) {
            q.z -= 0.0015;
            lit = texture(shadow_map, q);
        }
    }
    vec3 light = sky_rgb * ambient * ao * (0.8 + 0.2 * n.z) + sun_rgb * sun_strength * ndl * lit;
    vec3 col = base * light * exposure;
    if (ground_view == 1) {
        float dist = length(v_pos - cam_pos);
        col = mix(col, haze_rgb, 1.0 - exp(-dist / visibility));
    }
    frag = vec4(col, 1.0);
}
'''

# llvmpipe shades every branch of a fragment shader (masked SIMD lanes), so the scene uses two
# builds of _FS: one with the roof and facade patterns for buildings and landmarks, one with
# the rest for the ground and the trees. Each material sees the code it had in one shader.
_FS_BUILDINGS = _FS.replace('#version 330\n', '#version 330\n#define BUILDINGS\n', 1)

_SHADOW_VS = '''
#version 330
uniform mat4 mvp;
in vec3 in_pos;
void main() { gl_Position = mvp * vec4(in_pos, 1.0); }
'''

_SHADOW_FS = '''
#version 330
void main() { }
'''

# A triangle covering the screen, at mid depth (the sky pass tests against the resolve's).
_FULL_VS = '''
#version 330
void main() {
    vec2 p = vec2((gl_VertexID == 1) ? 3.0 : -1.0, (gl_VertexID == 2) ? 3.0 : -1.0);
    gl_Position = vec4(p, 0.0, 1.0);
}
'''

# The output-size image: the box filter of the supersampled scene (alpha = coverage, 0 where
# nothing was drawn); depth 0 marks pixels the scene covers fully, for the sky pass to skip.
# Rows come out top-down, as the image is read. Built once per factor SS, a constant, so no
# loop or branch is left in the code.
_RESOLVE_FS = '''
#version 330
uniform sampler2D scene;
uniform vec2 out_size;
out vec4 frag;
void main() {
    ivec2 o = ivec2(gl_FragCoord.xy);
    int row = int(out_size.y) - 1 - o.y;
#if SS == 2
    // The bilinear sample at the corner four texels share is their mean.
    vec4 acc = texture(scene, (vec2(o.x, row) + 0.5) / out_size);
#else
    vec4 acc = vec4(0.0);
    for (int j = 0; j < SS; ++j)
        for (int i = 0; i < SS; ++i)
            acc += texelFetch(scene, ivec2(o.x * SS + i, row * SS + j), 0);
    acc /= float(SS * SS);
#endif
    frag = acc;
    gl_FragDepth = acc.a > 0.999 ? 0.0 : 1.0;
}
'''

# The sky behind the resolved scene, at the output size (blended by 1 - coverage). The sky is
# smooth, so one sample per output pixel gives the image of a sky drawn behind the scene at
# the supersampled size, for a quarter of the work at 2x.
_SKY_FS = '''
#version 330
uniform vec2 out_size;
uniform mat4 inv_vp;
uniform vec3 cam_pos;
uniform vec3 sun_dir;
uniform vec3 sun_rgb;
uniform vec3 zenith_rgb;
uniform vec3 horizon_rgb;
uniform vec3 haze_rgb;
uniform float clouds;
uniform float exposure;
out vec4 frag;
float hash(vec2 p) {
    p = mod(p, 1024.0);
    vec3 p3 = fract(vec3(p.xyx) * 0.1031);
    p3 += dot(p3, p3.yzx + 33.33);
    return fract((p3.x + p3.y) * p3.z);
}
float vnoise(vec2 p) {
    vec2 i = floor(p), f = fract(p);
    f = f * f * (3.0 - 2.0 * f);
    return mix(mix(hash(i), hash(i + vec2(1, 0)), f.x),
               mix(hash(i + vec2(0, 1)), hash(i + vec2(1, 1)), f.x), f.y);
}
void main() {
    // Output row y holds the scene's row out_size.y - 1 - y (see _RESOLVE_FS).
    vec2 px = vec2(gl_FragCoord.x, out_size.y - gl_FragCoord.y);
    vec2 ndc = px / out_size * 2.0 - 1.0;
    vec4 w = inv_vp * vec4(ndc, 1.0, 1.0);
    vec3 dir = normalize(w.xyz / w.w - cam_pos);
    float up = clamp(dir.z, 0.0, 1.0);
    vec3 col = mix(horizon_rgb, zenith_rgb, pow(up, 0.55));
    col += sun_rgb * 0.5 * pow(max(dot(dir, sun_dir), 0.0), 48.0);
    if (dir.z > 0.005 && clouds > 0.0) {
        vec2 uv = dir.xy / (dir.z + 0.08) * 1.5;
        float c = 0.55 * vnoise(uv) + 0.3 * vnoise(uv * 2.7) + 0.15 * vnoise(uv * 6.1);
        float cover = smoothstep(1.0 - 0.7 * clouds, 1.15 - 0.5 * clouds, c);
        col = mix(col, vec3(0.93, 0.94, 0.96) * (0.8 + 0.2 * c), cover * (0.4 + 0.6 * up));
    }
    if (dir.z < 0.0) col = haze_rgb;
    frag = vec4(col * exposure, 1.0);
}
'''

_CHUNK_GL = ('flat', 'solid', 'trees', 'shadow', 'flat_vbo', 'solid_vbo', 'flat_ibo', 'solid_ibo')
_ATTRS = ('in_pos', 'in_nrm', 'in_mat', 'in_col', 'in_uv', 'in_tint', 'in_obj')
_FMT = '3f 3f 1f 1f 2f 1f 1f'


def create_context():
    """Return a headless moderngl EGL context; InputError naming the packages if impossible."""
    try:
        import moderngl
    except ImportError as exc:
        raise InputError(f'moderngl is not installed ({exc}); pip install moderngl') from None
    try:
        return moderngl.create_context(standalone=True, backend='egl')
    except Exception as exc:  # moderngl raises bare Exceptions for a missing EGL/GL
        raise InputError(
            f'cannot create a headless EGL OpenGL context ({str(exc).splitlines()[0]}); '
            f'install the Debian packages {EGL_PACKAGES} '
            f'(apt-get install {EGL_PACKAGES})') from None


# --------------------------------------------------------------------------------------------
# Camera maths (row-major numpy matrices; transposed when written to GL)

def camera_axes(heading_deg, pitch_deg=0.0, roll_deg=0.0):
    """Return (right, up, forward) unit vectors in ENU of a camera pose."""
    h, p, r = (math.radians(v) for v in (heading_deg, pitch_deg, roll_deg))
    f0 = np.array([math.sin(h), math.cos(h), 0.0])
    r0 = np.array([math.cos(h), -math.sin(h), 0.0])
    u0 = np.array([0.0, 0.0, 1.0])
    f = f0 * math.cos(p) + u0 * math.sin(p)
    u = -f0 * math.sin(p) + u0 * math.cos(p)
    right = r0 * math.cos(r) + u * math.sin(r)
    up = u * math.cos(r) - r0 * math.sin(r)
    return right, up, f


def view_matrix(eye, heading_deg, pitch_deg=0.0, roll_deg=0.0):
    """Return the 4x4 world-to-camera matrix (OpenGL: camera looks along -z)."""
    right, up, f = camera_axes(heading_deg, pitch_deg, roll_deg)
    m = np.eye(4)
    m[0, :3], m[1, :3], m[2, :3] = right, up, -f
    m[:3, 3] = -m[:3, :3] @ np.asarray(eye, float)
    return m


def perspective(hfov_deg, aspect, near, far, vfov_deg=None):
    """Return a 4x4 perspective projection from a horizontal FOV (aspect = width / height)."""
    tx = math.tan(math.radians(hfov_deg) / 2)
    ty = math.tan(math.radians(vfov_deg) / 2) if vfov_deg else tx / aspect
    m = np.zeros((4, 4))
    m[0, 0], m[1, 1] = 1 / tx, 1 / ty
    m[2, 2] = -(far + near) / (far - near)
    m[2, 3] = -2 * far * near / (far - near)
    m[3, 2] = -1.0
    return m


def _frustum_planes(vp):
    rows = [vp[3] + vp[0], vp[3] - vp[0], vp[3] + vp[1], vp[3] - vp[1], vp[3] + vp[2],
            vp[3] - vp[2]]
    return np.array(rows)


def _boxes_in_frustum(planes, boxes):
    """Return a mask of AABBs (K, 6: xmin ymin zmin xmax ymax zmax) touching the frustum."""
    keep = np.ones(len(boxes), bool)
    for pl in planes:
        px = np.where(pl[0] >= 0, boxes[:, 3], boxes[:, 0])
        py = np.where(pl[1] >= 0, boxes[:, 4], boxes[:, 1])
        pz = np.where(pl[2] >= 0, boxes[:, 5], boxes[:, 2])
        keep &= pl[0] * px + pl[1] * py + pl[2] * pz + pl[3] >= 0
    return keep


def _light_matrix(sun, region, z_top):
    """Return an orthographic light view-projection covering a ground region (x0 y0 x1 y1)."""
    f = -np.asarray(sun, float)
    f /= np.linalg.norm(f)
    ref = np.array([0.0, 1.0, 0.0]) if abs(f[2]) > 0.999 else np.array([0.0, 0.0, 1.0])
    right = np.cross(f, ref)
    right /= np.linalg.norm(right)
    up = np.cross(right, f)
    view = np.eye(4)
    view[0, :3], view[1, :3], view[2, :3] = right, up, -f
    x0, y0, x1, y1 = region
    pts = np.array([[x, y, z, 1.0] for x in (x0, x1) for y in (y0, y1) for z in (0.0, z_top)])
    lv = pts @ view.T
    lo, hi = lv[:, :3].min(0), lv[:, :3].max(0)
    proj = np.eye(4)
    proj[0, 0], proj[0, 3] = 2 / (hi[0] - lo[0]), -(hi[0] + lo[0]) / (hi[0] - lo[0])
    proj[1, 1], proj[1, 3] = 2 / (hi[1] - lo[1]), -(hi[1] + lo[1]) / (hi[1] - lo[1])
    # Camera looks along -z: depth runs from -hi[2] (near) to -lo[2] (far), padded.
    near, far = -hi[2] - 5.0, -lo[2] + 5.0
    proj[2, 2], proj[2, 3] = -2 / (far - near), -(far + near) / (far - near)
    return proj @ view


def _noise_texture(size=256, seed=12345):
    """Return a tiling smooth value-noise image (size x size uint8), the same on every run."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float64)
    amp, total = 1.0, 0.0
    for cells in (8, 16, 32, 64):
        grid = rng.random((cells, cells))
        x = np.arange(size) * cells / size
        i0 = np.floor(x).astype(int)
        f = x - i0
        f = f * f * (3 - 2 * f)
        i1 = (i0 + 1) % cells
        rows = grid[i0] * (1 - f)[:, None] + grid[i1] * f[:, None]
        layer = rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]
        img += amp * layer
        total += amp
        amp *= 0.5
    img /= total
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255 + 0.5).astype(np.uint8)


def _indexed(vertices):
    """Return (unique vertices, uint32 indices) of a triangle list (n, VERTEX_FLOATS)."""
    vertices = np.ascontiguousarray(vertices, np.float32)
    if not len(vertices):
        return vertices, np.zeros(0, np.uint32)
    rows = vertices.view(np.dtype((np.void, vertices.shape[1] * 4))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return vertices[first], inverse.astype(np.uint32).ravel()


def _set(prog, name, value):
    # Drivers drop uniforms a shader does not use; setting one must not fail.
    if name in prog:
        prog[name].value = value


def _put(prog, name, data):
    if name in prog:
        prog[name].write(data)


def _gl(m):
    return np.ascontiguousarray(np.asarray(m, np.float32).T).tobytes()


# --------------------------------------------------------------------------------------------
# Presets

#: Ground cameras: FOV, height and tilt come from the world's knobs (see dataset.py).
DRONE = dict(altitude_m=(30.0, 120.0), pitch_deg=(-90.0, -30.0), fov_deg=(60.0, 90.0))
PANO_SIZE = (1024, 256)


class GroundRenderer:
    """Render ground, drone, panorama and orthophoto views of a city with moderngl/EGL.

    ``width`` x ``height`` pixels (default output size); ``supersample`` (an integer >= 1)
    renders ``supersample`` x the output size in each direction and box-filters it down
    (anti-aliasing; 1 turns it off). Create it in the process that uses it (one EGL context
    per process, after fork).
    """

    def __init__(self, city, width=512, height=384, supersample=2, chunk_m=256.0,
                 max_chunks=160, shadow_size=1024):
        import moderngl
        self.city = city
        self.width, self.height = int(width), int(height)
        if self.width < 8 or self.height < 8:
            raise InputError(f'image size {width}x{height} is too small; use at least 8x8')
        self.supersample = max(1, int(supersample))
        self.chunk_m = float(chunk_m)
        self.max_chunks = int(max_chunks)
        #: Trees farther than this (metres, chunk centre) are not drawn in perspective views.
        self.tree_lod_m = 500.0
        #: Far plane (metres) of perspective views of 512 pixels and more; haze hides it.
        self.far_m = 1200.0
        self.ctx = create_context()
        self._mgl = moderngl
        ctx = self.ctx
        #: The scene programs: ground and trees, buildings and landmarks (same uniforms).
        self.prog = ctx.program(vertex_shader=_VS, fragment_shader=_FS)
        self.bprog = ctx.program(vertex_shader=_VS, fragment_shader=_FS_BUILDINGS)
        self._progs = (self.prog, self.bprog)
        self.shadow_prog = ctx.program(vertex_shader=_SHADOW_VS, fragment_shader=_SHADOW_FS)
        self._resolvers = {}
        self.sky_prog = ctx.program(vertex_shader=_FULL_VS, fragment_shader=_SKY_FS)
        self.sky_vao = ctx.vertex_array(self.sky_prog, [])
        self._set_all('palette', 0)
        self._set_all('shadow_map', 1)
        self._set_all('noise_tex', 2)
        self._noise = ctx.texture((256, 256), 1, _noise_texture().tobytes())
        self._noise.filter = (moderngl.LINEAR, moderngl.LINEAR)
        self._noise.repeat_x = self._noise.repeat_y = True
        self._palettes = {}
        self._fbos = {}
        self._chunks = OrderedDict()
        self.shadow_size = int(shadow_size)
        self._shadow_tex = {}
        self.half_extent = city.size_m / 2.0 + C._EXTRA_M + 300.0
        n = int(math.ceil(self.half_extent / self.chunk_m))
        keys = [(i, j) for i in range(-n, n) for j in range(-n, n)]
        self._keys = keys
        grow = 110.0
        self._key_boxes = np.array([[i * chunk_m - grow, j * chunk_m - grow, -1.0,
                                     (i + 1) * chunk_m + grow, (j + 1) * chunk_m + grow, 170.0]
                                    for i, j in keys])
        # Fields to the horizon around the chunked area (a ring: no overdraw inside).
        big = C._MeshBuf()
        e, m = 30000.0, n * chunk_m
        big.quads([[(-e, -e), (e, -e), (e, -m), (-e, -m)], [(-e, m), (e, m), (e, e), (-e, e)],
                   [(-e, -m), (-m, -m), (-m, m), (-e, m)], [(m, -m), (e, -m), (e, m), (m, m)]],
                  0.0, C.MAT_GRASS, S.FIELD)
        self._ground_vbo = ctx.buffer(big.array().tobytes())
        self._ground_vao = ctx.vertex_array(
            self.prog, [(self._ground_vbo, _FMT) + _ATTRS], skip_errors=True)
        self.default_style = city.style
        self.stats = dict(chunks_built=0)

    # ---------------------------------------------------------------- resources
    def _set_all(self, name, value):
        for prog in self._progs:
            _set(prog, name, value)

    def _put_all(self, name, data):
        for prog in self._progs:
            _put(prog, name, data)

    def _current(self):
        """Make this renderer's context current (several renderers may share a process)."""
        if self.ctx is None:
            raise InputError('this renderer was closed; create a new GroundRenderer')
        self.ctx.__enter__()

    def _palette(self, style):
        tex = self._palettes.get(style)
        if tex is None:
            table = S.palette(style)
            tex = self.ctx.texture((S.PALETTE_SIZE, 1), 3, table.astype('f4').tobytes(),
                                   dtype='f4')
            tex.filter = (self._mgl.NEAREST, self._mgl.NEAREST)
            self._palettes[style] = tex
        return tex

    def _fbo(self, w, h, kind='scene'):
        """Return the framebuffer of a ``w`` x ``h`` pass, made once per size and kind.

        'scene': a colour texture that the resolve pass reads; 'label': a renderbuffer with a
        depth texture that is read back; 'out': the resolved output-size image (renderbuffers).
        """
        key = (w, h, kind)
        fbo = self._fbos.get(key)
        if fbo is None:
            if kind == 'scene':
                color = self.ctx.texture((w, h), 4)
                color.filter = (self._mgl.LINEAR, self._mgl.LINEAR)
            else:
                color = self.ctx.renderbuffer((w, h), 4)
            depth = self.ctx.depth_texture((w, h)) if kind == 'label' else \
                self.ctx.depth_renderbuffer((w, h))
            fbo = self.ctx.framebuffer(color_attachments=[color], depth_attachment=depth)
            self._fbos[key] = fbo
        return fbo

    def _resolver(self, ss):
        entry = self._resolvers.get(ss)
        if entry is None:
            fs = _RESOLVE_FS.replace('#version 330\n', f'#version 330\n#define SS {ss}\n', 1)
            prog = self.ctx.program(vertex_shader=_FULL_VS, fragment_shader=fs)
            _set(prog, 'scene', 3)
            entry = (prog, self.ctx.vertex_array(prog, []))
            self._resolvers[ss] = entry
        return entry

    def _shadow(self, size):
        entry = self._shadow_tex.get(size)
        if entry is None:
            tex = self.ctx.depth_texture((size, size))
            tex.compare_func = '<='
            tex.filter = (self._mgl.LINEAR, self._mgl.LINEAR)
            tex.repeat_x = tex.repeat_y = False
            entry = (tex, self.ctx.framebuffer(depth_attachment=tex))
            self._shadow_tex[size] = entry
        return entry

    def _chunk(self, key):
        ch = self._chunks.get(key)
        if ch is not None:
            self._chunks.move_to_end(key)
            return ch
        i, j = key
        cm = self.chunk_m
        flat, ranges, solid, solid_ranges = C.chunk_mesh(
            self.city, (i * cm, j * cm, (i + 1) * cm, (j + 1) * cm))
        ctx = self.ctx
        ch = dict(ranges=ranges, solid_ranges=solid_ranges, n_flat=len(flat),
                  centre=np.array([(i + 0.5) * cm, (j + 0.5) * cm]))

        # Indexed meshes: a vertex shared by several triangles is shaded once (the vertex
        # stage runs on one thread in llvmpipe). Index order is the triangle order, so the
        # ranges above count indices and the images are those of the unindexed mesh.
        def upload(mesh, triangles):
            verts, index = _indexed(triangles)
            ch[f'{mesh}_vbo'] = ctx.buffer(verts.tobytes())
            ch[f'{mesh}_ibo'] = ctx.buffer(index.tobytes())

        def vao(prog, mesh, layout=(_FMT,) + _ATTRS, **kw):
            return ctx.vertex_array(prog, [(ch[f'{mesh}_vbo'],) + tuple(layout)],
                                    index_buffer=ch[f'{mesh}_ibo'], index_element_size=4, **kw)

        upload('flat', flat)
        ch['flat'] = vao(self.prog, 'flat', skip_errors=True)
        ch['n_solid'] = len(solid)
        if len(solid):
            upload('solid', solid)
            ch['solid'] = vao(self.bprog, 'solid', skip_errors=True)
            ch['trees'] = vao(self.prog, 'solid', skip_errors=True)
            ch['shadow'] = vao(self.shadow_prog, 'solid', ('3f 36x', 'in_pos'))
        self._chunks[key] = ch
        self.stats['chunks_built'] += 1
        while len(self._chunks) > self.max_chunks:
            _, old = self._chunks.popitem(last=False)
            for name in _CHUNK_GL:
                if name in old:
                    old[name].release()
        return ch

    def _visible(self, vp):
        mask = _boxes_in_frustum(_frustum_planes(vp), self._key_boxes)
        return [self._keys[k] for k in np.flatnonzero(mask)]

    def _region_keys(self, region):
        x0, y0, x1, y1 = region
        b = self._key_boxes
        mask = (b[:, 3] >= x0) & (b[:, 0] <= x1) & (b[:, 4] >= y0) & (b[:, 1] <= y1)
        return [self._keys[k] for k in np.flatnonzero(mask)]

    # ---------------------------------------------------------------- drawing
    def _set_lighting(self, light, ground_view, cam_pos=(0.0, 0.0, 0.0)):
        self._noise.use(2)
        values = dict(sun_dir=tuple(float(v) for v in light.sun_vector()),
                      sun_rgb=tuple(light.sun_rgb), sky_rgb=tuple(light.sky_rgb),
                      haze_rgb=tuple(light.horizon_rgb), sun_strength=float(light.sun_strength),
                      ambient=float(light.ambient), visibility=float(light.visibility_m),
                      exposure=float(light.exposure), ground_view=int(ground_view),
                      cam_pos=tuple(float(v) for v in cam_pos))
        for name, value in values.items():
            self._set_all(name, value)
        self._palette(light.season or self.default_style).use(0)

    def _render_shadow(self, light, region, size):
        tex, fbo = self._shadow(size)
        lm = _light_matrix(light.sun_vector(), region, 160.0)
        # Casters may stand outside the region and throw their shadow into it.
        el = max(math.radians(light.sun_elevation_deg), math.radians(8.0))
        reach = min(120.0 / math.tan(el), 300.0)
        sx, sy = -light.sun_vector()[:2] / (np.linalg.norm(light.sun_vector()[:2]) + 1e-9)
        x0, y0, x1, y1 = region
        grown = (min(x0, x0 - sx * reach), min(y0, y0 - sy * reach),
                 max(x1, x1 - sx * reach), max(y1, y1 - sy * reach))
        fbo.use()
        fbo.clear(depth=1.0)
        self.ctx.enable(self._mgl.DEPTH_TEST)
        self.ctx.depth_func = '<'
        # Closed solids: the surface nearest the sun faces it, so back faces change nothing.
        self.ctx.front_face = 'ccw'
        self.ctx.enable(self._mgl.CULL_FACE)
        _put(self.shadow_prog, 'mvp', _gl(lm))
        for key in self._region_keys(grown):
            ch = self._chunk(key)
            if ch['n_solid']:
                ch['shadow'].render()
        self.ctx.disable(self._mgl.CULL_FACE)
        tex.use(1)
        self._put_all('light_mvp', _gl(lm))
        self._set_all('use_shadow', 1)

    def _draw_scene(self, vp, keys, label=False, eye=None, tree_m=None, front='ccw'):
        """Draw solids (near to far), then the flat ground layers from the top one down.

        Drawing what is in front first lets the depth test skip the shading of hidden
        fragments, the main cost on a CPU rasterizer. Back faces are culled: every solid is
        closed and wound counter-clockwise seen from outside, and the ground layers face up.
        """
        ctx = self.ctx
        self._put_all('mvp', _gl(vp))
        self._set_all('label_mode', int(label))
        ctx.enable(self._mgl.DEPTH_TEST)
        ctx.front_face = front
        ctx.enable(self._mgl.CULL_FACE)
        chunks = [self._chunk(k) for k in keys]
        if eye is not None:
            dist = [float(np.linalg.norm(ch['centre'] - eye[:2])) for ch in chunks]
            order = np.argsort(dist)
            chunks = [chunks[k] for k in order]
            dist = [dist[k] for k in order]
        else:
            dist = [0.0] * len(chunks)
        ctx.depth_func = '<'
        for ch, d in zip(chunks, dist):
            if ch['n_solid']:
                first, count = ch['solid_ranges']['structures']
                if count:
                    ch['solid'].render(first=first, vertices=count)
                first, count = ch['solid_ranges']['trees']
                if count and (tree_m is None or d < tree_m):
                    ch['trees'].render(first=first, vertices=count)
        # Flat layers, stored top layer first: the depth test rejects what lies under a
        # higher layer before it is shaded.
        for ch in chunks:
            if ch['n_flat']:
                ch['flat'].render()
        self._ground_vao.render()
        ctx.disable(self._mgl.CULL_FACE)
        ctx.front_face = 'ccw'

    def _read(self, fbo, w, h):
        """Return the colour of a label framebuffer, (h, w, 3) uint8, row 0 at the top."""
        raw = fbo.read(components=3, alignment=1)
        return np.ascontiguousarray(np.frombuffer(raw, np.uint8).reshape(h, w, 3)[::-1])

    def _perspective_frame(self, east_m, north_m, height_m, heading_deg, fov_deg, pitch_deg,
                           roll_deg, w, h, vfov_deg=None, near=0.25, far=4000.0):
        eye = np.array([east_m, north_m, height_m], float)
        view = view_matrix(eye, heading_deg, pitch_deg, roll_deg)
        proj = perspective(fov_deg, w / h, near, far, vfov_deg)
        return eye, proj @ view

    def render(self, east_m, north_m, height_m, heading_deg, fov_deg, pitch_deg=0.0,
               roll_deg=0.0, lighting=None, size=None, vfov_deg=None):
        """Render a perspective view; return (height, width, 3) uint8 RGB.

        Camera at (east_m, north_m) ENU metres, ``height_m`` above the ground, looking along
        ``heading_deg`` (clockwise from north) with ``pitch_deg`` (negative = down) and
        ``roll_deg``; ``fov_deg`` is the horizontal field of view. ``lighting`` is a
        :class:`styles.Lighting` (default: the orthophoto's). ``size`` (width, height)
        overrides the renderer's size.
        """
        if not (math.isfinite(east_m) and math.isfinite(north_m) and math.isfinite(height_m)):
            raise InputError(f'camera position ({east_m}, {north_m}, {height_m}) is not finite')
        if not 1.0 <= fov_deg <= 170.0:
            raise InputError(f'fov_deg={fov_deg} is out of range; use 1..170 degrees')
        self._current()
        light = lighting or S.ortho_lighting(self.city.style, self.city.origin[0])
        w, h = size or (self.width, self.height)
        ss = self.supersample
        # Small images cannot show far detail: draw less of it (level of detail by size).
        detail = min(1.0, (w * ss / 1024.0) ** 0.5)
        eye, vp = self._perspective_frame(east_m, north_m, height_m, heading_deg, fov_deg,
                                          pitch_deg, roll_deg, w, h, vfov_deg,
                                          near=max(0.25, 0.02 * height_m),
                                          far=self.far_m * detail)
        keys = self._visible(vp)
        if light.shadows:
            fwd = camera_axes(heading_deg, pitch_deg)[2]
            reach = 130.0 + 1.5 * height_m
            cx, cy = eye[0] + fwd[0] * reach * 0.75, eye[1] + fwd[1] * reach * 0.75
            self._render_shadow(light, (cx - reach, cy - reach, cx + reach, cy + reach),
                                self.shadow_size if detail >= 1 else self.shadow_size // 2)
        else:
            self._set_all('use_shadow', 0)
        fbo = self._fbo(w * ss, h * ss)
        fbo.use()
        # Alpha 0 marks the sky: the resolve pass fills it in at the output size.
        fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        self._set_lighting(light, True, eye)
        self._draw_scene(vp, keys, eye=eye, tree_m=self.tree_lod_m * detail)
        return self._resolve(fbo, w, h, ss, (light, vp, eye))

    def _resolve(self, fbo, w, h, ss, sky=None):
        """Box-filter the ``ss`` x supersampled image of ``fbo`` to w x h (over the sky).

        ``sky`` is ``(lighting, vp, eye)`` for perspective views, None for the orthophoto.
        Returns (h, w, 3) uint8 RGB, row 0 at the top.
        """
        ctx, mgl = self.ctx, self._mgl
        out = self._fbo(w, h, 'out')
        out.use()
        ctx.enable(mgl.DEPTH_TEST)
        ctx.depth_func = '1'
        fbo.color_attachments[0].use(3)
        prog, vao = self._resolver(int(ss))
        _set(prog, 'out_size', (float(w), float(h)))
        vao.render(mgl.TRIANGLES, vertices=3)
        if sky is not None:
            # Only pixels the scene does not cover fully pass the depth test; the sky is
            # added with the weight 1 - coverage (the alpha already in the image).
            self._set_sky(*sky, w, h)
            ctx.depth_func = '<'
            ctx.fbo.depth_mask = False
            ctx.enable(mgl.BLEND)
            ctx.blend_func = mgl.ONE_MINUS_DST_ALPHA, mgl.ONE
            self.sky_vao.render(mgl.TRIANGLES, vertices=3)
            ctx.disable(mgl.BLEND)
            ctx.fbo.depth_mask = True
        ctx.depth_func = '<'
        # A fresh buffer per image: the caller owns (and may change) what it gets.
        buf = bytearray(w * h * 3)
        out.read_into(buf, components=3, alignment=1)
        return np.frombuffer(buf, np.uint8).reshape(h, w, 3)

    def _set_sky(self, light, vp, eye, w, h):
        sp = self.sky_prog
        _set(sp, 'out_size', (float(w), float(h)))
        _put(sp, 'inv_vp', _gl(np.linalg.inv(vp)))
        _set(sp, 'cam_pos', tuple(float(v) for v in eye))
        _set(sp, 'sun_dir', tuple(float(v) for v in light.sun_vector()))
        _set(sp, 'sun_rgb', tuple(light.sun_rgb))
        _set(sp, 'zenith_rgb', tuple(light.zenith_rgb))
        _set(sp, 'horizon_rgb', tuple(light.horizon_rgb))
        _set(sp, 'haze_rgb', tuple(light.horizon_rgb))
        _set(sp, 'clouds', float(light.clouds))
        _set(sp, 'exposure', float(light.exposure))

    def render_labels(self, east_m, north_m, height_m, heading_deg, fov_deg, pitch_deg=0.0,
                      roll_deg=0.0, size=None):
        """Return ``(ids, depth_m)`` of a perspective view (no anti-aliasing).

        ``ids`` (h, w) int: 0 for ground/trees/sky, k + 1 for ``city.buildings[k]``, then
        landmarks; ``depth_m`` (h, w): distance along the optical axis in metres (inf: sky).
        """
        self._current()
        w, h = size or (self.width, self.height)
        near, far = 0.25, 4000.0
        eye, vp = self._perspective_frame(east_m, north_m, height_m, heading_deg, fov_deg,
                                          pitch_deg, roll_deg, w, h, near=near, far=far)
        fbo = self._fbo(w, h, 'label')
        fbo.use()
        fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
        self._set_all('use_shadow', 0)
        self._draw_scene(vp, self._visible(vp), label=True)
        ids = self._read(fbo, w, h).astype(np.int64)
        ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        raw = fbo.read(components=1, attachment=-1, dtype='f4')
        z = np.frombuffer(raw, np.float32).reshape(h, w)[::-1]
        zn = 2.0 * z.astype(np.float64) - 1.0
        depth = 2.0 * near * far / (far + near - zn * (far - near))
        depth[z >= 1.0] = np.inf
        return ids, depth

    # ---------------------------------------------------------------- orthophoto
    def render_ortho(self, px_to_enu, width, height, lighting=None, labels=False,
                     supersample=None):
        """Render a top-down orthographic tile; return (height, width, 3) uint8 RGB.

        ``px_to_enu`` is a 2x3 affine matrix mapping pixel-corner coordinates (col, row; the
        top-left corner of the image is (0, 0)) to ENU metres, so the tile may be rotated and
        scaled (a UTM grid in the city's ENU frame). With ``labels`` the result is the (h, w)
        int object id image (see :meth:`render_labels`).
        """
        self._current()
        a = np.asarray(px_to_enu, float).reshape(2, 3)
        light = lighting or S.ortho_lighting(self.city.style, self.city.origin[0])
        ss = 1 if labels else (self.supersample if supersample is None else int(supersample))
        w, h = int(width), int(height)
        # ENU -> pixel (inverse affine), then pixel -> NDC (row 0 at the top).
        full = np.vstack([a, [0.0, 0.0, 1.0]])
        inv = np.linalg.inv(full)
        ndc = np.array([[2.0 / w, 0.0, -1.0], [0.0, -2.0 / h, 1.0], [0.0, 0.0, 1.0]]) @ inv
        vp = np.zeros((4, 4))
        vp[0, 0], vp[0, 1], vp[0, 3] = ndc[0]
        vp[1, 0], vp[1, 1], vp[1, 3] = ndc[1]
        zlo, zhi = -5.0, 400.0
        vp[2, 2], vp[2, 3] = -2.0 / (zhi - zlo), (zhi + zlo) / (zhi - zlo)
        vp[3, 3] = 1.0
        corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], float) @ a.T
        region = (corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(),
                  corners[:, 1].max())
        keys = self._region_keys(region)
        # Up-facing triangles are counter-clockwise on screen unless the grid mirrors ENU.
        front = 'ccw' if np.linalg.det(ndc[:2, :2]) > 0 else 'cw'
        if labels:
            fbo = self._fbo(w, h, 'label')
            fbo.use()
            fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
            self._set_all('use_shadow', 0)
            self._draw_scene(vp, keys, label=True, front=front)
            ids = self._read(fbo, w, h).astype(np.int64)
            return ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        if light.shadows:
            side = max(region[2] - region[0], region[3] - region[1])
            size = int(min(4096, max(1024, 2 ** math.ceil(math.log2(side / 0.25)))))
            self._render_shadow(light, region, size)
        else:
            self._set_all('use_shadow', 0)
        fbo = self._fbo(w * ss, h * ss)
        fbo.use()
        fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
        self._set_lighting(light, False)
        self._draw_scene(vp, keys, front=front)
        return self._resolve(fbo, w, h, ss)

    def render_ortho_box(self, xmin, ymin, xmax, ymax, width, height, lighting=None,
                         labels=False):
        """Render the north-up ENU box (metres) as a ``width`` x ``height`` orthophoto."""
        a = [[(xmax - xmin) / width, 0.0, xmin], [0.0, -(ymax - ymin) / height, ymax]]
        return self.render_ortho(a, width, height, lighting, labels)

    # ---------------------------------------------------------------- presets
    def render_drone(self, east_m, north_m, altitude_m, heading_deg, pitch_deg, fov_deg=75.0,
                     lighting=None, size=None):
        """Render a drone view: ``altitude_m`` 30-120 m, ``pitch_deg`` -90..-30 (looking down)."""
        if not (DRONE['altitude_m'][0] <= altitude_m <= DRONE['altitude_m'][1]):
            raise InputError(f'drone altitude {altitude_m} m is outside 30..120 m')
        if not (DRONE['pitch_deg'][0] <= pitch_deg <= DRONE['pitch_deg'][1]):
            raise InputError(f'drone pitch {pitch_deg} deg is outside -90..-30 degrees')
        return self.render(east_m, north_m, altitude_m, heading_deg, fov_deg, pitch_deg, 0.0,
                           lighting, size)

    def render_pano(self, east_m, north_m, height_m, heading_deg=0.0, lighting=None,
                    size=PANO_SIZE):
        """Render a 360-degree equirectangular panorama, as from a 4-camera rig.

        ``size`` (width, height) covers 360 degrees of azimuth, starting at ``heading_deg`` on
        the left edge, and ``360 * height / width`` degrees of elevation centred on the
        horizon. Returns (height, width, 3) uint8 RGB.
        """
        import cv2
        W, H = int(size[0]), int(size[1])
        vspan = 360.0 * H / W
        if vspan >= 170.0:
            raise InputError(f'panorama size {W}x{H} spans {vspan:.0f} degrees vertically; '
                             'use width >= 2.2 x height')
        face_w = max(64, W // 4)
        # Faces need more vertical FOV than 90 degrees: their corners see higher elevations.
        tmax = math.tan(math.radians(vspan / 2)) * math.sqrt(2.0)
        vfov = 2 * math.degrees(math.atan(tmax))
        face_h = int(math.ceil(face_w * tmax))
        faces = [self.render(east_m, north_m, height_m, heading_deg + 45.0 + 90.0 * k, 90.0,
                             lighting=lighting, size=(face_w, face_h), vfov_deg=vfov)
                 for k in range(4)]
        az = (np.arange(W) + 0.5) / W * 360.0  # relative to heading_deg
        el = (0.5 - (np.arange(H) + 0.5) / H) * vspan
        az, el = np.meshgrid(az, el)
        face = np.floor(az / 90.0).astype(int) % 4
        rel = np.radians(az - (45.0 + 90.0 * face))
        x = np.tan(rel)
        y = np.tan(np.radians(el)) / np.cos(rel)
        mx = ((x + 1.0) / 2.0 * face_w - 0.5).astype(np.float32)
        my = ((1.0 - y / tmax) / 2.0 * face_h - 0.5).astype(np.float32)
        strip = np.concatenate(faces, axis=1)
        mx += (face * face_w).astype(np.float32)
        return cv2.remap(strip, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def close(self):
        """Release the GL resources and the context."""
        if self.ctx is None:
            return
        self.ctx.__enter__()
        for ch in self._chunks.values():
            for name in _CHUNK_GL:
                if name in ch:
                    ch[name].release()
        self._chunks.clear()
        self.ctx.release()
        self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
