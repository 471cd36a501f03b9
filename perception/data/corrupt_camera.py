"""Camera image corruptions of `perception data corrupt` (docs/robustness.md): each takes one decoded image and
returns its corrupted copy. Parameters per severity 1..5 are the tables below, cited in docs/robustness.md.

Images are BGR uint8 as OpenCV decodes them; the float work is in [0, 1] float32 and vectorised (OpenCV and
numpy), one image at a time. Random draws come from the per-file generator the caller passes, always the same
draws in the same order whatever the severity, so that a file's severity-5 corruption is drawn from the same
numbers as its severity-1 one.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from perception.errors import DataError

JPEG_QUALITY = 95  # re-encoding quality of corrupted camera files (nuScenes' own JPEGs are of about this quality)

# Hendrycks & Dietterich 2019 (ImageNet-C), `brightness`: added to the HSV value channel.
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
# RoboBEV (Xie et al. 2023), `LowLight`: the image is stretched to [0, c] with gamma 2, then Poisson (photon
# count scale) and Gaussian (read noise) noise; values per severity 1..5 (RoboBEV indexes them from 0).
LOW_LIGHT_CEILING = (0.60, 0.50, 0.40, 0.30, 0.20)
LOW_LIGHT_PHOTONS = (600.0, 250.0, 120.0, 50.0, 30.0)  # 10 x ImageNet-C's shot-noise scale
LOW_LIGHT_READ_NOISE = (0.008, 0.012, 0.018, 0.026, 0.038)  # 0.1 x ImageNet-C's Gaussian-noise sigma
# ImageNet-C `fog`: (thickness, fractal wibble decay).
FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))
# ImageNet-C `snow`: (flake mean, flake std, zoom, threshold, blur radius px, blur sigma px, image weight).
SNOW = ((0.1, 0.3, 3.0, 0.5, 10, 4, 0.8), (0.2, 0.3, 2.0, 0.5, 12, 4, 0.7), (0.55, 0.3, 4.0, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
# ImageNet-C `motion_blur`: (radius px, sigma px); the direction is uniform in [-45, 45] degrees.
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))
# RoboBEV `ColorQuant` (PIL posterize to 5 - severity bits), shifted by one so that severity 5 keeps 1 bit, not 0.
COLOR_QUANT_BITS = (5, 4, 3, 2, 1)

IMAGE_CORRUPTIONS = ("brightness", "low_light", "fog_camera", "snow_camera", "motion_blur_camera", "color_quant")


def _to_float(bgr: np.ndarray) -> np.ndarray:
    return bgr.astype(np.float32) * np.float32(1 / 255)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def brightness(bgr: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(_to_float(bgr), cv2.COLOR_BGR2HSV)  # float input: H in degrees, S and V in [0, 1]
    hsv[..., 2] = np.minimum(hsv[..., 2] + np.float32(BRIGHTNESS[severity - 1]), 1)
    return _to_uint8(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))


def low_light(bgr: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Darken with gamma 2 into [0, c], then add shot and read noise. The shot noise (Poisson of `photons` x
    value, divided by `photons`) is drawn from its Gaussian approximation and merged with the read noise into one
    Gaussian of variance value / photons + read^2: one float32 draw instead of numpy's much slower Poisson."""
    x = _to_float(bgr)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) * np.float32(1 / max(hi - lo, 1e-6))
    x = x * x * np.float32(LOW_LIGHT_CEILING[severity - 1])
    var = x * np.float32(1 / LOW_LIGHT_PHOTONS[severity - 1]) + np.float32(LOW_LIGHT_READ_NOISE[severity - 1] ** 2)
    x += np.sqrt(var) * rng.standard_normal(x.shape, dtype=np.float32)
    return _to_uint8(x)


def fractal_noise(height: int, width: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """(height, width) float32 fractal noise in [0, 1]: octaves on grids of 2, 4, ..., 2^L points a side (2^L the
    power of two covering the image), each bilinearly upsampled into the next, the amplitude divided by `decay`
    from one octave to the next, as in the diamond-square plasma fractal of ImageNet-C; normalised to [0, 1] over
    the whole square, then cropped."""
    levels = max(1, math.ceil(math.log2(max(height, width, 2))))
    canvas = np.zeros((1, 1), np.float32)
    amplitude = 1.0
    for k in range(1, levels + 1):
        n = 1 << k
        canvas = cv2.resize(canvas, (n, n), interpolation=cv2.INTER_LINEAR)
        canvas += (rng.random((n, n), dtype=np.float32) * 2 - 1) * np.float32(amplitude)
        amplitude /= decay
    canvas -= canvas.min()
    canvas *= np.float32(1 / max(float(canvas.max()), 1e-12))
    return canvas[:height, :width]


def fog(bgr: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    thickness, decay = FOG[severity - 1]
    x = _to_float(bgr)
    peak = float(x.max())
    x += np.float32(thickness) * fractal_noise(x.shape[0], x.shape[1], decay, rng)[..., None]
    return _to_uint8(x * np.float32(peak / (peak + thickness)))


def motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """The correlation kernel of ImageMagick's one-sided motion blur: 2 ceil(radius) + 1 taps at distances
    0, 1, ... along `angle_deg` (0: +x, 90: +y), weights exp(-i^2 / 2 sigma^2) normalised to 1."""
    width = 2 * math.ceil(radius) + 1
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i * i) / (2 * sigma * sigma))
    weights /= weights.sum()
    theta = math.radians(angle_deg)
    dx = np.ceil(i * math.cos(theta) - 0.5).astype(int)
    dy = np.ceil(i * math.sin(theta) - 0.5).astype(int)
    c = width - 1
    kernel = np.zeros((2 * c + 1, 2 * c + 1), np.float64)
    np.add.at(kernel, (c + dy, c + dx), weights)
    return kernel.astype(np.float32)


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    kernel = motion_kernel(radius, sigma, angle_deg)
    keep = np.nonzero(kernel.any(axis=1))[0], np.nonzero(kernel.any(axis=0))[0]
    c = kernel.shape[0] // 2  # crop the kernel to its non-zero rows and columns, anchor kept at the centre tap
    rows, cols = keep
    r0, r1 = min(rows.min(), c), max(rows.max(), c)
    c0, c1 = min(cols.min(), c), max(cols.max(), c)
    return cv2.filter2D(x, -1, kernel[r0:r1 + 1, c0:c1 + 1], anchor=(c - c0, c - r0), borderType=cv2.BORDER_REFLECT)


def motion_blur(bgr: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = MOTION_BLUR[severity - 1]
    angle = float(rng.uniform(-45, 45))
    return _to_uint8(_motion_blur(_to_float(bgr), radius, sigma, angle))


def snow(bgr: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    mean, std, zoom, threshold, radius, sigma, weight = SNOW[severity - 1]
    x = _to_float(bgr)
    h, w = x.shape[:2]
    flakes = rng.standard_normal((h, w), dtype=np.float32) * np.float32(std) + np.float32(mean)
    ch, cw = max(1, math.ceil(h / zoom)), max(1, math.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2  # zoom the centre of the layer: bigger, sparser flakes
    flakes = cv2.resize(flakes[top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    flakes[flakes < threshold] = 0
    np.clip(flakes, 0, 1, out=flakes)
    flakes = _motion_blur(flakes, radius, sigma, float(rng.uniform(-135, -45)))
    gray = cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)[..., None] * np.float32(1.5) + np.float32(0.5)
    x = np.float32(weight) * x + np.float32(1 - weight) * np.maximum(x, gray)
    x += (flakes + flakes[::-1, ::-1])[..., None]
    return _to_uint8(x)


def color_quant(bgr: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    bits = COLOR_QUANT_BITS[severity - 1]
    return bgr & np.uint8((0xFF << (8 - bits)) & 0xFF)


_FUNCTIONS = {
    "brightness": brightness,
    "low_light": low_light,
    "fog_camera": fog,
    "snow_camera": snow,
    "motion_blur_camera": motion_blur,
    "color_quant": color_quant,
}


def corrupt_image(name: str, bgr: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The corruption `name` (one of `IMAGE_CORRUPTIONS`) of one BGR uint8 image at `severity` 1..5."""
    return _FUNCTIONS[name](bgr, severity, rng)


def corrupt_jpeg(name: str, raw: bytes, severity: int, rng: np.random.Generator, path: str = "") -> bytes:
    """Decode a camera JPEG, corrupt it and re-encode it (quality `JPEG_QUALITY`). Raises DataError naming `path`
    when the file does not decode."""
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError("camera image does not decode as a JPEG", path=path)
    ok, buf = cv2.imencode(".jpg", corrupt_image(name, bgr, severity, rng), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DataError("cannot encode the corrupted image as JPEG", path=path)
    return buf.tobytes()
