"""The 15 CIFAR-10-C common corruptions at 5 severities (Hendrycks & Dietterich, ICLR 2019).

Severity constants are the CIFAR ones of hendrycks/robustness
``ImageNet-C/create_c/make_cifar_c.py`` (not imagecorruptions' ImageNet constants). The
algorithms follow that script, rewritten on numpy, scipy.ndimage and Pillow
(no ImageMagick/Wand, no OpenCV):

- ``motion_blur`` (and the snow layer of ``snow``): ImageMagick's MotionBlurImage
  reimplemented: a one-sided line kernel of ``2·ceil(radius) + 1`` taps along the angle,
  Gaussian weights ``exp(-i²/2σ²)`` (normalised), tap offsets rounded to whole pixels,
  border pixels repeated.
- ``glass_blur``: the reference's sequential local pixel "swaps" (offsets drawn from
  ``{-δ, ..., δ-1}`` as its ``randint`` does), vectorised over the batch. The reference's
  ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on a numpy array is a one-way copy, not a
  swap (the right-hand side holds views; the second assignment reads the pixel the first one
  overwrote), so ``x[h', w']`` is copied onto ``x[h, w]`` and ``x[h', w']`` is kept, as there.
- ``brightness`` and ``saturate``: the reference's float HSV round trip (scikit-image's
  ``rgb2hsv`` / ``hsv2rgb`` arithmetic), truncated to uint8 exactly as ``np.uint8`` does.
- ``pixelate``: the image as uint8 in Pillow, ``BOX`` down and up (rounding at each pass),
  as the reference; float images are rounded to 8 bits for it, like ``jpeg_compression``.
- ``spatter`` (extra): the reference's OpenCV steps (Canny, distance transform, histogram
  equalisation, emboss filter) rewritten on numpy/scipy; the exact Euclidean distance replaces
  OpenCV's 5×5 chamfer approximation.
- ``frost``: the reference blends random crops of six frost photographs, which are not
  shipped. :func:`frost_textures` draws five procedural frost textures instead (fixed seeds,
  nothing downloaded, no image files): a plasma-fractal haze plus dendritic ice crystals
  (needles with side branches at ±60°, as hexagonal ice grows), slightly blurred, scaled to
  the grey-level mean and spread measured on the reference's photographs and tinted bluish
  white. The blend ``a·x + b·frost``, its constants and the random crop are the reference's.
  Frost numbers are therefore close to, not equal to, CIFAR-10-C's.
- ``fog``: the reference's diamond-square plasma fractal, one map per image.

Images: a batch ``[N, H, W]`` (greyscale) or ``[N, H, W, C]`` with C = 1 or 3, either
uint8 in 0..255 or floating point in [0, 1]. The result has the same shape, dtype and range.
uint8 results are truncated like the reference's ``np.uint8(...)``. The constants the
reference gives as fractions of the 32-pixel side (elastic) scale with the image side, pixel
constants (blur radii, sigmas) are kept, so 28×28 (MNIST) and 32×32 both work. Greyscale
images use the grey forms of the colour operations (brightness: the HSV value of a grey pixel
is the pixel; snow: the grey image is the image; frost: the texture's luminance).

Determinism: the output depends only on (images, name, severity, seed). Images are processed
in chunks of :data:`CHUNK`, each with its own generator seeded from
(seed, corruption, severity, chunk). ``defocus_blur``, ``zoom_blur``, ``brightness``,
``contrast``, ``pixelate`` and ``jpeg_compression`` use no randomness at all.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from kdbench.errors import ConfigError

#: the 15 CIFAR-10-C corruptions, in the reference's order (and its ``.npy`` file names)
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: the four further corruptions of the CIFAR-10-C release ("extra": not in the 15-corruption mean)
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
#: all 19 files of the CIFAR-10-C release
ALL: tuple[str, ...] = CORRUPTIONS + EXTRA
#: corruptions that use no random numbers
DETERMINISTIC: frozenset[str] = frozenset(
    {
        "defocus_blur",
        "zoom_blur",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
        "gaussian_blur",
        "saturate",
    }
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: images per chunk (bounds memory; part of what determines the random draws)
CHUNK = 1024
#: bump when an algorithm or constant changes (invalidates cached corrupted sets)
VERSION = 2

Op = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


# --------------------------------------------------------------------------- helpers


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian of each image: spatial axes only, 'nearest' borders, truncate 4."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)


def _grey(x: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601, as cv2's RGB2GRAY) ``[N, H, W, 1]``; greyscale images are their own."""
    if x.shape[-1] == 1:
        return x
    return (x[..., :3] @ np.array([0.299, 0.587, 0.114]))[..., None]


@functools.lru_cache(maxsize=256)
def _zoom_matrix(length: int, z: float) -> np.ndarray:
    """[length, length] linear map of one axis: crop the centre ``ceil(length / z)`` samples,
    zoom by ``z`` (scipy.ndimage.zoom, order 1) and crop the centre ``length`` back."""
    c = int(np.ceil(length / z))
    top = (length - c) // 2
    m = ndimage.zoom(np.eye(c), (z, 1), order=1)  # column j: the zoomed unit vector e_j
    trim = (m.shape[0] - length) // 2
    full = np.zeros((length, length))
    full[:, top : top + c] = m[trim : trim + length]
    full.setflags(write=False)
    return full


def _clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
    """Zoom the centre of each image ``[N, H, W, C]`` by ``z`` (bilinear), cropped to size.

    The reference's crop + ``scipy.ndimage.zoom(order=1)`` + crop; order-1 zoom is separable,
    so it is applied as one matrix per axis.
    """
    h, w = x.shape[1:3]
    xt = x.transpose(0, 3, 1, 2)  # [N, C, H, W]: two batched matrix products
    out = _zoom_matrix(h, float(z)) @ xt @ _zoom_matrix(w, float(z)).T
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def motion_blur_batch(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """Blur each image ``[N, H, W, C]`` along a line at ``angles[n]`` degrees (see module doc)."""
    width = int(2 * np.ceil(radius) + 1)
    taps = np.arange(width)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(np.asarray(angles, dtype=np.float64))
    # whole-pixel offsets of each tap, rounded half up
    dcol = np.ceil(taps[None, :] * np.cos(theta)[:, None] - 0.5).astype(np.int64)
    drow = np.ceil(taps[None, :] * np.sin(theta)[:, None] - 0.5).astype(np.int64)
    n, h, w = x.shape[:3]
    batch = np.arange(n)[:, None, None]
    out = np.zeros_like(x)
    for j in range(width):
        rows = np.clip(np.arange(h)[None, :] + drow[:, j, None], 0, h - 1)
        cols = np.clip(np.arange(w)[None, :] + dcol[:, j, None], 0, w - 1)
        out += weights[j] * x[batch, rows[:, :, None], cols[:, None, :]]
    return out


def plasma_fractal(rng: np.random.Generator, n: int, size: int, decay: float) -> np.ndarray:
    """``n`` diamond-square height maps ``[n, size, size]`` in [0, 1] (``size`` a power of 2).

    The reference's variant: each new point is the mean of its four neighbours plus
    ``wibble · U(-wibble, wibble)``, with ``wibble`` starting at 100 and divided by ``decay``
    at each level; the map wraps around.
    """
    if size & (size - 1):
        raise ValueError(f"plasma_fractal: size must be a power of two, got {size}")
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def jitter(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0:size:step, 0:size:step]
        sq = corners + np.roll(corners, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, half:size:step, half:size:step] = jitter(sq)
        centres = m[:, half:size:step, half:size:step]
        corners = m[:, 0:size:step, 0:size:step]
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        m[:, 0:size:step, half:size:step] = jitter(top)
        left = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        m[:, half:size:step, 0:size:step] = jitter(left)
        step = half
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


#: seeds of the procedural frost textures (fixed: the textures are part of the corruption)
FROST_TEXTURE_SEED = 20190101


def _dendrite(canvas: np.ndarray, rng: np.random.Generator, y: float, x: float, angle: float) -> None:
    """Draw one ice crystal: a needle with side branches at ±60°, recursively (wraps around)."""
    size = canvas.shape[0]
    stack = [(y, x, angle, rng.uniform(0.08, 0.25) * size, 1.0, 2)]
    while stack:
        y0, x0, a, length, bright, depth = stack.pop()
        t = np.arange(0.0, length, 0.5)
        rows = np.round(y0 + t * np.sin(a)).astype(np.int64) % size
        cols = np.round(x0 + t * np.cos(a)).astype(np.int64) % size
        fade = bright * (1.0 - 0.5 * t / max(length, 1e-6))
        np.maximum.at(canvas, (rows, cols), fade)
        if depth == 0 or length < 3:
            continue
        for pos in rng.uniform(0.15, 0.9, size=rng.integers(2, 6)):
            side = a + rng.choice([-1.0, 1.0]) * np.pi / 3 + rng.normal(0, 0.08)
            by, bx = y0 + pos * length * np.sin(a), x0 + pos * length * np.cos(a)
            stack.append((by, bx, side, length * rng.uniform(0.2, 0.45), bright * 0.85, depth - 1))


#: brightness statistics of the reference's frost photographs after its 0.2x resize (the five
#: it draws from): mean grey level, standard deviation, per-channel offset from the mean (RGB)
FROST_MEAN, FROST_STD = 0.64, 0.11
FROST_TINT = np.array([-0.07, 0.01, 0.06])


@functools.lru_cache(maxsize=4)
def frost_textures(size: int = 128, count: int = 5) -> np.ndarray:
    """``count`` procedural frost textures ``[count, size, size, 3]`` in [0, 1] (read-only).

    Each: a plasma-fractal haze plus about 150 seeded ice crystals (see :func:`_dendrite`),
    Gaussian-blurred (σ 0.8), then scaled to the grey-level mean and spread of the
    reference's frost photographs (:data:`FROST_MEAN`, :data:`FROST_STD`) and tinted blue
    (:data:`FROST_TINT`). Seeds ``FROST_TEXTURE_SEED + k``; no image files are involved.
    """
    out = np.empty((count, size, size, 3))
    for k in range(count):
        rng = np.random.default_rng(FROST_TEXTURE_SEED + k)
        pow2 = 1 << int(np.ceil(np.log2(size)))
        haze = plasma_fractal(rng, 1, pow2, 2.0)[0, :size, :size]
        crystals = np.zeros((size, size))
        for _ in range(150):
            y, x = rng.uniform(0, size, 2)
            _dendrite(crystals, rng, y, x, rng.uniform(0, 2 * np.pi))
        crystals = ndimage.gaussian_filter(crystals, 0.8, mode="wrap")
        value = 0.5 * haze + crystals / max(crystals.std(), 1e-6) * 0.12
        value = (value - value.mean()) / max(value.std(), 1e-6) * FROST_STD + FROST_MEAN
        out[k] = np.clip(value[..., None] + FROST_TINT, 0, 1)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------- corruptions
# each op maps float images [N, H, W, C] in [0, 1] (float64) to float images (clipped later)


def _gaussian_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[s - 1]
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (500, 250, 100, 75, 50)[s - 1]
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.01, 0.02, 0.03, 0.05, 0.07)[s - 1]
    hit = rng.random(x.shape) < c  # salt & pepper on each value, half and half
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """Normalised disk kernel (17×17 up to radius 8), antialiased by a small Gaussian."""
    if radius <= 8:
        grid, k = np.arange(-8, 9), 3
    else:
        grid, k = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    t = np.arange(k) - k // 2
    g = np.exp(-(t**2) / (2.0 * alias_blur**2))
    g /= g.sum()
    disk = ndimage.correlate1d(disk, g, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, g, axis=1, mode="mirror")


def _defocus_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[s - 1]
    kernel = _disk(radius, alias)
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


def _glass_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    sigma, delta, iters = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))[s - 1]
    y = np.floor(np.clip(_gauss(x, sigma), 0, 1) * 255) / 255  # the reference's uint8 step
    n, h, w = y.shape[:3]
    hs, ws = range(h - delta, delta, -1), range(w - delta, delta, -1)
    # offsets in {-delta, ..., delta - 1}: the reference's randint(-delta, delta)
    d = rng.integers(-delta, delta, size=(iters, len(hs), len(ws), 2, n))
    b = np.arange(n)
    for it in range(iters):
        for i, hh in enumerate(hs):
            for j, ww in enumerate(ws):
                hp, wp = hh + d[it, i, j, 1], ww + d[it, i, j, 0]
                y[b, hh, ww] = y[b, hp, wp]  # a copy, as the reference's "swap" (module doc)
    return _gauss(y, sigma)


def _motion_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))[s - 1]
    angles = rng.uniform(-45, 45, size=len(x))
    return motion_blur_batch(x, radius, sigma, angles)


def _zoom_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    end = (1.06, 1.11, 1.16, 1.21, 1.26)[s - 1]
    zooms = np.arange(1, end, 0.01)  # as the reference (its float arange includes the end)
    xt = x.transpose(0, 3, 1, 2)  # [N, C, H, W]
    out = xt.copy()
    for z in zooms:
        out += _zoom_matrix(x.shape[1], float(z)) @ xt @ _zoom_matrix(x.shape[2], float(z)).T
    return (out / (len(zooms) + 1)).transpose(0, 2, 3, 1)


def _snow(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, thresh, radius, sigma, keep = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[s - 1]
    n, h, w = x.shape[:3]
    layer = rng.normal(loc=loc, scale=scale, size=(n, h, w, 1))
    layer = _clipped_zoom(layer, zoom)
    layer[layer < thresh] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255) / 255  # the reference's 8-bit layer
    angles = rng.uniform(-135, -45, size=n)
    layer = np.round(motion_blur_batch(layer, radius, sigma, angles) * 255) / 255
    x = keep * x + (1 - keep) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2, axes=(1, 2))


def _frost(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    a, b = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[s - 1]
    n, h, w, c = x.shape
    tex = frost_textures(max(128, 2 * max(h, w)))
    size = tex.shape[1]
    which = rng.integers(len(tex), size=n)
    top = rng.integers(0, size - h, size=n)
    left = rng.integers(0, size - w, size=n)
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    crop = tex[which[:, None, None], rows, cols]  # [N, H, W, 3]
    if c == 1:
        crop = _grey(crop)
    return a * x + b * crop


def _fog(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    a, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[s - 1]
    n, h, w = x.shape[:3]
    size = max(32, 1 << int(np.ceil(np.log2(max(h, w)))))
    fog = plasma_fractal(rng, n, size, decay)[:, :h, :w, None]
    top = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + a * fog) * top / (top + a)


def _rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value of RGB ``[..., 3]`` in [0, 1], in scikit-image's arithmetic
    (the reference's ``rgb2hsv``: when several channels are the maximum, blue wins, then green)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    delta = v - x.min(axis=-1)
    grey = delta == 0
    safe = np.where(grey, 1.0, delta)
    h = np.where(g == v, 2.0 + (b - r) / safe, (g - b) / safe)
    h = np.where(b == v, 4.0 + (r - g) / safe, h)
    h = np.where(grey, 0.0, (h / 6.0) % 1.0)
    s = np.where(grey, 0.0, delta / np.where(v > 0, v, 1.0))
    return h, s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RGB ``[..., 3]`` from hue, saturation, value, in scikit-image's ``hsv2rgb`` arithmetic."""
    sextant = np.floor(h * 6)
    f = h * 6 - sextant
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    # (R, G, B) of each sextant of the hue circle
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    )
    pick = (sextant.astype(np.int64) % 6)[None, ..., None]
    return np.take_along_axis(table, np.repeat(pick, 3, axis=-1), axis=0)[0]


def _in_colour(x: np.ndarray, op: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a colour operation ``[N, H, W, 3] -> [N, H, W, 3]``; a grey image as its RGB copy,
    the result back to grey (luma)."""
    if x.shape[-1] == 3:
        return op(x)
    out = op(np.repeat(x, 3, axis=-1))
    grey = (out[..., :1] == out[..., 1:2]) & (out[..., :1] == out[..., 2:])
    return np.where(grey, out[..., :1], _grey(out))  # a grey result pixel keeps its exact value


def _brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c (clipped), hue and saturation kept; for greyscale this is ``x + c``."""
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[s - 1]

    def op(rgb: np.ndarray) -> np.ndarray:
        h, sat, v = _rgb_to_hsv(np.clip(rgb, 0, 1))
        return _hsv_to_rgb(h, sat, np.clip(v + c, 0, 1))

    return _in_colour(x, op)


def _saturate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """HSV saturation ``· a + b`` (clipped), hue and value kept (an extra CIFAR-10-C corruption)."""
    a, b = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[s - 1]

    def op(rgb: np.ndarray) -> np.ndarray:
        h, sat, v = _rgb_to_hsv(np.clip(rgb, 0, 1))
        return _hsv_to_rgb(h, np.clip(sat * a + b, 0, 1), v)

    return _in_colour(x, op)


def _speckle_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.06, 0.1, 0.12, 0.16, 0.2)[s - 1]
    return x + x * rng.normal(scale=c, size=x.shape)


def _gaussian_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    return _gauss(x, (0.4, 0.6, 0.7, 0.8, 1.0)[s - 1])


def _contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[s - 1]
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def _elastic_transform(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    n, h, w, c = x.shape
    side = min(h, w)  # the reference's IMSIZE (32)
    alpha, sigma, spread = (
        np.array(
            [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)][s - 1]
        )
        * side
    )
    # random affine: three points around the centre each moved by U(-spread, spread), (x, y) order
    cx, cy = float(w // 2), float(h // 2)
    sq = side // 3
    src = np.array([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]])
    dst = src[None] + rng.uniform(-spread, spread, size=(n, 3, 2))
    hom = np.concatenate([src, np.ones((3, 1))], axis=1)  # [3, 3]
    fwd = np.linalg.solve(hom[None], dst).transpose(0, 2, 1)  # [n, 2, 3]: dst = A @ [x, y, 1]
    inv_lin = np.linalg.inv(fwd[:, :, :2])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([xx, yy], axis=-1)[None] - fwd[:, None, None, :, 2]  # [n, h, w, 2]
    srcxy = np.einsum("nij,nhwj->nhwi", inv_lin, pts)
    x = _bilinear(x, srcxy[..., 1], srcxy[..., 0], "mirror")  # cv2 BORDER_REFLECT_101
    # smooth random displacement field
    dx = ndimage.gaussian_filter(
        rng.uniform(-1, 1, size=(n, h, w)), (0, sigma, sigma), mode="reflect", truncate=3
    )
    dy = ndimage.gaussian_filter(
        rng.uniform(-1, 1, size=(n, h, w)), (0, sigma, sigma), mode="reflect", truncate=3
    )
    return _bilinear(x, yy[None] + alpha * dy, xx[None] + alpha * dx, "reflect")


def _fold(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Integer indices folded into 0..n-1: 'mirror' (d c b | a b c d), 'reflect' (c b a | a b c)."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1) if mode == "mirror" else 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - i - (0 if mode == "mirror" else 1), i)


def _bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Sample images ``[N, H, W, C]`` at (rows, cols) ``[N, H, W]``, bilinear, folded borders.

    map_coordinates(order=1) of each image, with the boundary rule applied to the four
    neighbouring pixels (scipy folds the coordinate itself; they differ only at the border).
    """
    n, h, w = x.shape[:3]
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    ra, rb = _fold(r0, h, mode), _fold(r0 + 1, h, mode)
    ca, cb = _fold(c0, w, mode), _fold(c0 + 1, w, mode)
    b = np.arange(n)[:, None, None]
    top = x[b, ra, ca] * (1 - fc) + x[b, ra, cb] * fc
    bottom = x[b, rb, ca] * (1 - fc) + x[b, rb, cb] * fc
    return top * (1 - fr) + bottom * fr


def _to_u8(x: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as uint8 (exact for images that came in as uint8)."""
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Pillow ``BOX`` resize of the uint8 image down by c and back up, as the reference."""
    c = (0.95, 0.9, 0.85, 0.75, 0.65)[s - 1]
    n, h, w, ch = x.shape
    small = (int(w * c), int(h * c))
    u8 = _to_u8(x)
    out = np.empty(x.shape)
    for i in range(n):
        img = Image.fromarray(u8[i] if ch == 3 else u8[i, :, :, 0])
        back = img.resize(small, Image.BOX).resize((w, h), Image.BOX)
        out[i] = np.asarray(back, dtype=np.float64).reshape(x.shape[1:])
    return out / 255


def _jpeg_compression(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    quality = (80, 65, 58, 50, 40)[s - 1]
    u8 = _to_u8(x)
    out = np.empty(x.shape)
    for i in range(len(x)):
        img = Image.fromarray(u8[i] if u8.shape[-1] == 3 else u8[i, :, :, 0])
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf), dtype=np.float64)
        out[i] = dec.reshape(x.shape[1:])
    return out / 255


def _canny(img: np.ndarray, low: int = 50, high: int = 150) -> np.ndarray:
    """Edges of a uint8 image ``[H, W]`` as OpenCV's ``Canny`` (3×3 Sobel, L1 magnitude,
    non-maximum suppression in four directions, hysteresis over 8-connected pixels)."""
    f = img.astype(np.int64)
    dx = ndimage.sobel(f, axis=1, mode="nearest")
    dy = ndimage.sobel(f, axis=0, mode="nearest")
    mag = np.pad(np.abs(dx) + np.abs(dy), 1)  # zero outside, as OpenCV's magnitude buffer
    h, w = img.shape

    def at(dr: int | np.ndarray, dc: int | np.ndarray) -> np.ndarray:
        rows, cols = np.mgrid[0:h, 0:w]
        return mag[rows + 1 + dr, cols + 1 + dc]

    m = mag[1:-1, 1:-1]
    ax, ay = np.abs(dx).astype(np.float64), np.abs(dy).astype(np.float64)
    tg22, tg67 = ax * np.tan(np.pi / 8), ax * np.tan(3 * np.pi / 8)
    s = np.where((dx ^ dy) < 0, -1, 1)
    horizontal = (m > at(0, -1)) & (m >= at(0, 1))
    vertical = (m > at(-1, 0)) & (m >= at(1, 0))
    diagonal = (m > at(-1, -s)) & (m > at(1, s))
    keep = np.where(ay < tg22, horizontal, np.where(ay > tg67, vertical, diagonal)) & (m > low)
    labels, count = ndimage.label(keep, structure=np.ones((3, 3)))
    strong = np.unique(labels[keep & (m > high)])
    return np.isin(labels, strong[strong > 0])


def _equalize_hist(img: np.ndarray) -> np.ndarray:
    """OpenCV's ``equalizeHist`` of a uint8 image."""
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    if hist[first] == img.size:
        return img.copy()
    cdf = np.cumsum(hist) - hist[first]
    lut = np.clip(np.rint(cdf * (255.0 / (img.size - hist[first]))), 0, 255).astype(np.uint8)
    return lut[img]


def _wet_spots(liquid: np.ndarray) -> np.ndarray:
    """The reference's water texture from a thresholded liquid layer ``[H, W]`` (severity 1-3):
    distance to the Canny edges, truncated, equalised, embossed and box-blurred."""
    u8 = (np.floor(liquid * 255).astype(np.int64) % 256).astype(np.uint8)  # numpy's wrapping cast
    edges = _canny(u8)
    dist = ndimage.distance_transform_edt(~edges) if edges.any() else np.full(u8.shape, 20.0)
    dist = ndimage.uniform_filter(np.minimum(dist, 20.0), 3, mode="mirror")
    dist = _equalize_hist(np.floor(dist).astype(np.uint8)).astype(np.int64)
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    dist = np.clip(ndimage.correlate(dist, emboss, mode="mirror"), 0, 255).astype(np.float64)
    m = u8 * ndimage.uniform_filter(dist, 3, mode="mirror")
    return m / m.max() if m.max() > 0 else m


def _spatter(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Water drops (severity 1-3, pale turquoise) or mud (4-5, brown) from a blurred random
    liquid layer (an extra CIFAR-10-C corruption; see the module doc)."""
    loc, scale, sigma, thresh, weight, mud = (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    )[s - 1]
    n, h, w = x.shape[:3]
    liquid = ndimage.gaussian_filter(
        rng.normal(loc, scale, size=(n, h, w)), (0, sigma, sigma), mode="nearest", truncate=4.0
    )
    liquid[liquid < thresh] = 0

    def op(rgb: np.ndarray) -> np.ndarray:
        if not mud:
            m = np.stack([_wet_spots(layer) for layer in liquid])[..., None] * weight
            return rgb + m * (np.array([175, 238, 238]) / 255)  # the reference's channel order
        m = ndimage.gaussian_filter((liquid > thresh).astype(np.float64), (0, weight, weight), mode="nearest")
        m = np.where(m < 0.8, 0.0, m)[..., None]
        return rgb * (1 - m) + m * (np.array([63, 42, 20]) / 255)

    return _in_colour(x, op)


_OPS: dict[str, Op] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "saturate": _saturate,
}
#: ops computed in the reference's own float arithmetic: truncated exactly as ``np.uint8``
#: (the others get an epsilon so that a value the reference computes as k lands on k)
_EXACT_TRUNCATION = frozenset({"brightness", "saturate"})


# --------------------------------------------------------------------------- public API


def check(name: str, severity: int) -> None:
    """Raise ConfigError unless ``name`` is a corruption and ``severity`` in 1..5."""
    if name not in _OPS:
        raise ConfigError(f"unknown corruption {name!r}; choose from: {', '.join(ALL)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption severity must be one of 1..5, got {severity!r}")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt a batch of images (see the module docstring for layouts, ranges and determinism)."""
    check(name, severity)
    images = np.asarray(images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(
            f"corrupt: expected images [N, H, W] or [N, H, W, C] with C in (1, 3), got {images.shape}"
        )
    is_u8 = images.dtype == np.uint8
    if not is_u8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"corrupt: images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    x = images if images.ndim == 4 else images[..., None]
    out = np.empty(x.shape, dtype=np.float64)
    op = _OPS[name]
    for k, start in enumerate(range(0, len(x), CHUNK)):
        chunk = x[start : start + CHUNK].astype(np.float64)
        if is_u8:
            chunk /= 255.0
        seq = np.random.SeedSequence([int(seed) % 2**63, ALL.index(name), severity, k])
        out[start : start + CHUNK] = op(chunk, severity, np.random.default_rng(seq))
    np.clip(out, 0.0, 1.0, out=out)
    out = out.reshape(images.shape)
    if is_u8:
        # truncation like the reference's np.uint8(); the epsilon keeps exact k/255 at k
        eps = 0.0 if name in _EXACT_TRUNCATION else 1e-6
        return np.floor(out * 255.0 + eps).astype(np.uint8)
    return out.astype(images.dtype)
