"""Deterministic synthetic knee volumes in the exact fastMRI single-coil format.

Each volume is a stack of coronal knee slices (femur on top, tibia below, as fastMRI shows its knee images)
drawn from smooth 3-D anatomy: bones are ellipsoids and cylinders blended with smooth unions, so every
structure changes gradually from slice to slice. Tissues (fat, muscle, marrow, cortical bone, cartilage,
joint fluid, menisci and ligaments) get per-contrast intensities and band-limited noise textures. The
complex image (with a smooth phase and a coil-like shading) is placed in the readout-oversampled matrix,
transformed to k-space, cut to an acquired band of phase-encoding columns and given complex Gaussian
noise. The target ``reconstruction_esc`` is then derived from that final k-space exactly as fastMRI does.

Library::

    paths = generate_dataset("data/synthetic", num_train=10, num_val=4)
    kspace, target, header_xml, attrs = synthesize_volume(0, 12, (128, 128), (256, 148), "CORPD_FBK")
    render_preview("data/synthetic", "docs/synthetic_slices.png")

Command line::

    python -m mri_models.data.synthetic --root DIR [--train N] [--val M] [--slices S] [--recon H W]
        [--kspace KH KW] [--seed K] [--preview PNG]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from mri_models.data.volume import (
    HEADER_KEY,
    KNEE_ACQUISITIONS,
    KSPACE_KEY,
    REQUIRED_ATTRS,
    TARGET_KEY,
    build_ismrmrd_header,
    write_volume,
)

# Bump when the generated content changes: it is part of every patient_id, so files written by an older
# generator are recognised as stale and rewritten instead of being silently reused.
GENERATOR_VERSION = 1
# The test split holds targets, unlike fastMRI's own: it is the held-out split of the final evaluation.
SPLITS = ("train", "val", "test")
DEFAULT_NUM_TRAIN = 10
DEFAULT_NUM_VAL = 4
DEFAULT_NUM_TEST = 4
DEFAULT_NUM_SLICES = 12
DEFAULT_RECON_SIZE = (128, 128)
DEFAULT_KSPACE_SIZE = (256, 148)  # 2x readout oversampling; the width is deliberately not the recon width
MIN_RECON_SIZE = 16  # below this the anatomy is a few pixels wide and meaningless

# Fraction of the phase-encoding matrix left unacquired on each side (real knee: 17 of 368 columns).
PE_PAD_FRACTION = 17 / 368

# Relative signal per tissue and contrast, fat in proton density = 1. Proton density: fat and fatty marrow
# bright, fluid fairly bright, muscle intermediate, fibrous tissue and cortical bone dark. Fat suppression
# (PDFS) darkens fat and marrow, which leaves joint fluid the brightest tissue.
TISSUE_SIGNAL: dict[str, dict[str, float]] = {
    "CORPD_FBK": {
        "fat": 1.0,
        "muscle": 0.40,
        "marrow": 0.84,
        "cortex": 0.05,
        "cartilage": 0.60,
        "fluid": 0.74,
        "fibrous": 0.07,
    },
    "CORPDFS_FBK": {
        "fat": 0.15,
        "muscle": 0.38,
        "marrow": 0.20,
        "cortex": 0.04,
        "cartilage": 0.56,
        "fluid": 1.0,
        "fibrous": 0.06,
    },
}
# Signal scale of a fat-like tissue (level 1.0): real fastMRI targets peak at about 1e-4..1e-3.
SIGNAL_SCALE_RANGE = (2.5e-4, 6.0e-4)
# k-space noise std relative to the signal scale; fat-suppressed scans are noticeably noisier.
NOISE_RANGE = {"CORPD_FBK": (0.018, 0.03), "CORPDFS_FBK": (0.03, 0.045)}


class SyntheticVolume(NamedTuple):
    """One generated volume, in the arguments of ``write_volume``."""

    kspace: np.ndarray  # (slices, KH, KW) complex64
    target: np.ndarray  # (slices, H, W) float32
    header_xml: str
    attrs: dict[str, Any]


# ------------------------------------------------------------------------------------------ validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_size(name: str, value: Sequence[int], minimum: int) -> tuple[int, int]:
    if len(value) != 2:
        raise ValueError(f"{name} must be (height, width), got {value!r}")
    return (_check_int(f"{name}[0]", value[0], minimum), _check_int(f"{name}[1]", value[1], minimum))


def _check_shapes(
    num_slices: int, recon_size: Sequence[int], kspace_size: Sequence[int]
) -> tuple[int, tuple[int, int], tuple[int, int]]:
    num_slices = _check_int("num_slices", num_slices, 1)
    recon = _check_size("recon_size", recon_size, MIN_RECON_SIZE)
    kspace = _check_size("kspace_size", kspace_size, MIN_RECON_SIZE)
    if kspace[0] < recon[0] or kspace[1] < recon[1]:
        raise ValueError(f"kspace_size {kspace} must be at least recon_size {recon} in both dimensions")
    return num_slices, recon, kspace


# --------------------------------------------------------------------------------------- k-space layout


def acquired_band(kspace_width: int) -> tuple[int, int, int, int]:
    """The acquired phase-encoding columns of a k-space matrix, as the ISMRMRD header describes them.

    Real knee data leaves a few percent of the columns on each side unacquired (exactly zero).

    Args:
        kspace_width: number of phase-encoding columns (KW).

    Returns:
        ``(pe_center, pe_maximum, padding_left, padding_right)`` with fastMRI's derivation
        ``padding_left = KW // 2 - center`` and ``padding_right = padding_left + maximum + 1``.
    """
    pad = max(1, round(kspace_width * PE_PAD_FRACTION))
    num_acquired = kspace_width - 2 * pad
    pe_center = num_acquired // 2
    pe_maximum = num_acquired - 1
    padding_left = kspace_width // 2 - pe_center
    return pe_center, pe_maximum, padding_left, padding_left + num_acquired


def _fft2c(image: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT over the last two axes (the inverse of fastMRI's ifft2c)."""
    axes = (-2, -1)
    return np.fft.fftshift(
        np.fft.fftn(np.fft.ifftshift(image, axes=axes), axes=axes, norm="ortho"), axes=axes
    )


def _ifft2c(kspace: np.ndarray) -> np.ndarray:
    """fastMRI's centred orthonormal 2-D inverse FFT: ifftshift, ifftn norm="ortho", fftshift."""
    axes = (-2, -1)
    return np.fft.fftshift(
        np.fft.ifftn(np.fft.ifftshift(kspace, axes=axes), axes=axes, norm="ortho"), axes=axes
    )


def _crop_offsets(full: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of fastMRI's centre crop (``transforms.center_crop``)."""
    return (full[0] - crop[0]) // 2, (full[1] - crop[1]) // 2


def reconstruction_esc(kspace: np.ndarray, recon_size: tuple[int, int]) -> np.ndarray:
    """The single-coil target as fastMRI derives it: the cropped magnitude of the centred inverse FFT.

    Args:
        kspace: (slices, KH, KW) complex k-space.
        recon_size: (H, W) of the target.
    """
    # Single precision, like fastMRI's own (torch) transforms.
    image = np.abs(_ifft2c(kspace.astype(np.complex64, copy=False)))
    top, left = _crop_offsets(kspace.shape[-2:], recon_size)
    return image[..., top : top + recon_size[0], left : left + recon_size[1]].astype(np.float32)


# ----------------------------------------------------------------------------------------- randomness


def volume_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one volume, derived from (seed, split, index) only.

    The N-th volume of a split is therefore the same however many volumes are generated.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    seed = _check_int("seed", seed, 0)
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def _band_noise(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    pixel: float,
    sigma: tuple[float, float],
    sigma_slices: float,
    highpass: float | None = None,
) -> np.ndarray:
    """Gaussian-filtered noise of unit standard deviation on the (slices, H, W) grid, float32.

    Built in the Fourier domain so it costs one inverse FFT. The slice axis is padded before the (periodic)
    transform so that the first and last slices are not correlated through the wrap-around.

    Args:
        rng: random generator.
        shape: (slices, H, W).
        pixel: pixel size in anatomy units, so the texture scale does not depend on the resolution.
        sigma: Gaussian smoothing (rows, columns) in anatomy units (anisotropic for muscle fibres).
        sigma_slices: smoothing along the slice axis, in slices.
        highpass: when given, subtract the noise smoothed with this isotropic sigma (a band-pass texture).
    """
    num_slices, height, width = shape
    pad = math.ceil(3 * sigma_slices) + 1
    depth = num_slices + 2 * pad
    spec_shape = (depth, height, width // 2 + 1)
    spectrum = rng.standard_normal(spec_shape, dtype=np.float32) + 1j * rng.standard_normal(
        spec_shape, dtype=np.float32
    )
    fz = np.fft.fftfreq(depth).astype(np.float32)[:, None, None]
    fy = np.fft.fftfreq(height, d=pixel).astype(np.float32)[None, :, None]
    fx = np.fft.rfftfreq(width, d=pixel).astype(np.float32)[None, None, :]
    two_pi2 = np.float32(2 * math.pi**2)
    z_term = sigma_slices**2 * fz**2
    gain = np.exp(-two_pi2 * (sigma[0] ** 2 * fy**2 + sigma[1] ** 2 * fx**2 + z_term))
    if highpass is not None:
        gain = gain - np.exp(-two_pi2 * (highpass**2 * (fy**2 + fx**2) + z_term))
    field = np.fft.irfftn(spectrum * gain, s=(depth, height, width), axes=(0, 1, 2))[pad : pad + num_slices]
    field = field.astype(np.float32)
    return field / np.float32(field.std() + 1e-12)


# ----------------------------------------------------------------------------------- shape primitives
# Anatomy is described by approximate signed distance functions (negative inside) in "anatomy units":
# the recon field of view spans about [-1, 1] along its shorter side. u runs medial (-) to lateral (+),
# v runs down the leg with v = 0 at the joint line, z runs anterior (-) to posterior (+) through the slab.


def _inside(sdf: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased membership: 1 inside, 0 outside, a one-pixel linear ramp across the boundary."""
    return np.clip(0.5 - sdf / np.float32(pixel), 0.0, 1.0)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two SDFs (polynomial smooth minimum with blend radius k)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth intersection of two SDFs."""
    return -_smin(-a, -b, k)


def _intersect(*sdfs: np.ndarray) -> np.ndarray:
    """Sharp intersection of SDFs (their maximum, broadcast)."""
    return functools.reduce(np.maximum, sdfs)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _section_scale(z: np.ndarray, center: float, half_depth: float) -> np.ndarray:
    """Radius factor of an ellipsoid's cross-section at slice positions z (0 where the slice misses it)."""
    return np.sqrt(np.clip(1.0 - ((z - center) / half_depth) ** 2, 0.0, 1.0)).astype(np.float32)


def _ellipsoid(
    u: np.ndarray,
    v: np.ndarray,
    z: np.ndarray,
    center: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    """SDF of an ellipsoid's cross-sections; far outside (1.0) in slices that miss it."""
    scale = _section_scale(z, center[2], radii[2])
    safe = np.maximum(scale, 1e-3)
    a, b = radii[0] * safe, radii[1] * safe
    k = np.sqrt(((u - center[0]) / a) ** 2 + ((v - center[1]) / b) ** 2)
    return (k - 1.0) * np.minimum(a, b) + (scale <= 0) * np.float32(1.0)


def _capsule(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r: float):
    """SDF of a 2-D segment p0-p1 thickened by r (a ligament)."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.sqrt((u - p0[0] - t * du) ** 2 + (v - p0[1] - t * dv) ** 2) - r


def _window(z: np.ndarray, start: float, stop: float, soft: float = 0.08) -> np.ndarray:
    """Smooth 0..1 presence of a structure between slice positions start and stop."""
    rise = 1.0 / (1.0 + np.exp(-(z - start) / soft))
    fall = 1.0 / (1.0 + np.exp((z - stop) / soft))
    return (rise * fall).astype(np.float32)


# ------------------------------------------------------------------------------------------ the anatomy


@dataclass(frozen=True)
class KneeGeometry:
    """Random geometry of one knee (anatomy units, see the shape primitives above)."""

    center: tuple[float, float]  # joint centre (x, y) in the image
    tilt: float  # in-plane rotation, radians
    lateral: int  # +1: lateral side on the image right, -1: on the left
    size: float
    slab: tuple[float, float]  # z of the first and the last slice
    leg_width: float
    fat_thickness: float
    gap: float  # half of the bone-to-bone joint gap
    cartilage: float
    condyle_offset: tuple[float, float]  # medial, lateral
    condyle_radii: tuple[float, float, float]  # (medial a, lateral a, b)
    condyle_z: tuple[float, float]
    lateral_lift: float
    shaft: tuple[float, float, float, float]  # half width, flare, z centre, z half depth
    notch: tuple[float, float, float]  # half width, depth, z onset
    tibia: tuple[float, float, float, float, float]  # plateau half width, shaft half width, z, depth, spine
    fibula_z: float
    patella_z: float
    fluid: float  # amount of joint effusion, 0..1
    pockets: tuple[tuple[float, float, float, float, float, float], ...]  # fluid recesses (ellipsoids)


def draw_geometry(rng: np.random.Generator) -> KneeGeometry:
    """Draw a random but anatomically ordered knee (every volume gets its own)."""
    size = rng.uniform(0.88, 1.02)

    def scaled(low: float, high: float) -> float:
        return float(size * rng.uniform(low, high))

    pockets = []
    for _ in range(int(rng.integers(1, 4))):
        side = rng.choice([-1.0, 1.0])
        pockets.append(
            (
                float(side * scaled(0.45, 0.62)),
                float(rng.uniform(-0.35, 0.0)),
                float(rng.uniform(-0.5, 0.5)),
                scaled(0.015, 0.035),
                scaled(0.05, 0.12),
                float(rng.uniform(0.1, 0.25)),
            )
        )
    # The suprapatellar recess: a flat pocket above the femur in anterior slices.
    pockets.append((0.0, float(rng.uniform(-0.7, -0.6)), -0.8, scaled(0.12, 0.22), 0.035, 0.2))
    return KneeGeometry(
        center=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(0.0, 0.12))),
        tilt=float(rng.uniform(-0.08, 0.08)),
        lateral=int(rng.choice([-1, 1])),
        size=float(size),
        slab=(float(rng.uniform(-0.82, -0.72)), float(rng.uniform(0.72, 0.82))),
        leg_width=scaled(0.8, 0.86),
        fat_thickness=scaled(0.06, 0.12),
        gap=scaled(0.034, 0.042),
        cartilage=scaled(0.024, 0.032),
        condyle_offset=(scaled(0.27, 0.3), scaled(0.26, 0.29)),
        condyle_radii=(scaled(0.24, 0.27), scaled(0.22, 0.25), scaled(0.17, 0.21)),
        condyle_z=(float(rng.uniform(0.05, 0.2)), float(rng.uniform(0.8, 0.9))),
        lateral_lift=scaled(0.0, 0.015),
        shaft=(scaled(0.19, 0.23), float(rng.uniform(0.4, 0.6)), float(rng.uniform(-0.3, -0.15)), 0.5),
        notch=(scaled(0.06, 0.08), scaled(0.22, 0.3), float(rng.uniform(-0.35, -0.15))),
        tibia=(
            scaled(0.54, 0.59),
            scaled(0.2, 0.23),
            float(rng.uniform(-0.05, 0.1)),
            0.9,
            scaled(0.03, 0.05),
        ),
        fibula_z=float(rng.uniform(0.35, 0.55)),
        patella_z=float(rng.uniform(-1.0, -0.95)),
        fluid=float(rng.uniform(0.3, 1.0)),
        pockets=tuple(pockets),
    )


def _coordinates(
    geometry: KneeGeometry, num_slices: int, recon_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Anatomy coordinates (u, v) of the recon grid, slice positions z, image rows y and the pixel size."""
    height, width = recon_size
    unit = min(height, width) / 2
    y = ((np.arange(height) - (height - 1) / 2) / unit).astype(np.float32)[:, None]
    x = ((np.arange(width) - (width - 1) / 2) / unit).astype(np.float32)[None, :]
    dx, dy = x - geometry.center[0], y - geometry.center[1]
    cos, sin = math.cos(geometry.tilt), math.sin(geometry.tilt)
    # Mirror u so that the lateral side is always +u in the anatomy code.
    u = (geometry.lateral * (cos * dx + sin * dy))[None].astype(np.float32)
    v = (-sin * dx + cos * dy)[None].astype(np.float32)
    # A single slice sits in the middle of the knee.
    z = (
        np.linspace(*geometry.slab, num_slices, dtype=np.float32)
        if num_slices > 1
        else np.zeros(1, np.float32)
    )
    return u, v, z[:, None, None], y[None], 1.0 / unit


def _condyle(
    g: KneeGeometry, u: np.ndarray, v: np.ndarray, z: np.ndarray, cu: float, a: float, b: float, lift: float
) -> np.ndarray:
    """One femoral condyle: round in every slice, long posteriorly, merging into the trochlea anteriorly.

    Away from its widest slice the section narrows and its lowest point rises a little, as cuts through a
    condyle that is round in the sagittal plane do.
    """
    centre, posterior_depth = g.condyle_z
    depth = np.where(z < centre, 1.15, posterior_depth).astype(np.float32)
    scale = np.sqrt(np.clip(1.0 - ((z - centre) / depth) ** 2, 0.0, 1.0))
    safe = np.maximum(scale, 1e-3)
    a_z, b_z = a * safe**0.6, b * safe**0.35
    bottom = g.gap + lift + 0.12 * (1.0 - scale)
    k = np.sqrt(((u - cu) / a_z) ** 2 + ((v + bottom + b_z) / b_z) ** 2)
    return (k - 1.0) * np.minimum(a_z, b_z) + (scale <= 0) * np.float32(1.0)


def _femur_sdf(g: KneeGeometry, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Femur: a shaft flaring into two condyles (ellipsoids), with the intercondylar notch deepening
    posteriorly (anteriorly the trochlea joins the condyles)."""
    half, flare, shaft_z, shaft_depth = g.shaft
    shaft_scale = _section_scale(z, shaft_z, shaft_depth)
    # The metaphysis widens towards the joint; the condyles below take over from the shaft.
    width = half * (1.0 + flare * _smoothstep((v + 0.7) / 0.45)) * np.maximum(shaft_scale, 1e-3)
    shaft = _smax(np.abs(u) - width, v + 0.2, 0.05) + (shaft_scale <= 0) * np.float32(1.0)
    a_med, a_lat, b = g.condyle_radii
    medial = _condyle(g, u, v, z, -g.condyle_offset[0], a_med, b, 0.0)
    lateral = _condyle(g, u, v, z, g.condyle_offset[1], a_lat, b, g.lateral_lift)
    femur = _smin(_smin(medial, lateral, 0.06), shaft, 0.12)
    notch_half, notch_depth, notch_z = g.notch
    depth = notch_depth / (1.0 + np.exp(-(z - notch_z) / 0.12)) + 1e-3
    notch = (np.sqrt((u / notch_half) ** 2 + ((v + g.gap) / depth) ** 2) - 1.0) * np.minimum(
        notch_half, depth
    )
    return _smax(femur, -notch, 0.03)


def _tibia_sdf(g: KneeGeometry, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Tibia: a wide plateau with the intercondylar eminence, narrowing into the shaft."""
    plateau, shaft, tz, depth, spine = g.tibia
    scale = _section_scale(z, tz, depth)
    # Slices that graze the plateau's rim cut it lower down.
    top = g.gap + 0.2 * (1.0 - scale) - spine * scale * np.exp(-((u / 0.06) ** 2))
    narrowing = _smoothstep((v - top - 0.08) / 0.45)
    half = (plateau - (plateau - shaft) * narrowing) * np.maximum(scale, 1e-3) ** 0.5
    return _smax(np.abs(u + 0.01) - half, top - v, 0.05) + (scale <= 0) * np.float32(1.0)


def _fibula_sdf(g: KneeGeometry, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Fibular head (lateral, below the plateau, posterior slices) and the top of its shaft."""
    uf = g.tibia[0] + 0.02
    head = _ellipsoid(u, v, z, (uf, 0.36, g.fibula_z), (0.085, 0.11, 0.3))
    scale = _section_scale(z, g.fibula_z, 0.25)
    neck = np.abs(u - uf - 0.01) - 0.045 * np.maximum(scale, 1e-3) + (scale <= 0) * np.float32(1.0)
    return _smin(head, _smax(neck, 0.4 - v, 0.02), 0.04)


def _patella_sdf(g: KneeGeometry, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Patella: an ellipsoid in front of the femur, visible in the most anterior slices."""
    return _ellipsoid(u, v, z, (0.0, -0.42, g.patella_z), (0.25, 0.28, 0.22))


def _textures(rng: np.random.Generator, shape: tuple[int, int, int], pixel: float) -> dict[str, np.ndarray]:
    """Band-limited noise fields shared by the tissues (unit std; each tissue weights them differently)."""
    fine = max(0.006, 0.9 * pixel)
    return {
        "coarse": _band_noise(rng, shape, pixel, (0.08, 0.08), 1.5),
        "medium": _band_noise(rng, shape, pixel, (0.025, 0.025), 1.0),
        "fibres": _band_noise(rng, shape, pixel, (0.16, max(0.016, 1.5 * pixel)), 1.0),
        "fine": _band_noise(rng, shape, pixel, (fine, fine), 0.5, highpass=3 * fine),
        "wobble": _band_noise(rng, shape, pixel, (0.12, 0.12), 2.0),
    }


def _paint(image: np.ndarray, weight: np.ndarray, value: np.ndarray | float) -> None:
    """Layer a tissue over the image in place (weight 0..1 is its anti-aliased membership)."""
    image += weight * (value - image)


@dataclass
class _Canvas:
    """The (slices, H, W) image being painted and what every tissue is drawn with.

    Attributes:
        image: the magnitude so far, painted in place.
        u, v, z: anatomy coordinates of the recon grid (see :func:`_coordinates`).
        pixel: the pixel size in anatomy units.
        tex: the shared noise textures (:func:`_textures`).
        level: each tissue's signal in this volume (its contrast's value, jittered).
    """

    image: np.ndarray
    u: np.ndarray
    v: np.ndarray
    z: np.ndarray
    pixel: float
    tex: dict[str, np.ndarray]
    level: dict[str, np.float32]

    def inside(self, sdf: np.ndarray) -> np.ndarray:
        return _inside(sdf, self.pixel)

    def paint(self, weight: np.ndarray, value: np.ndarray | float) -> None:
        _paint(self.image, weight, value)

    def textured(self, name: str, coarse: float, fine: float) -> np.ndarray:
        return self.level[name] * (1.0 + coarse * self.tex["coarse"] + fine * self.tex["fine"])


@dataclass(frozen=True)
class _Bones:
    """Signed distances of the bones, their outlines wobbled."""

    femur: np.ndarray
    tibia: np.ndarray
    fibula: np.ndarray
    patella: np.ndarray
    between: np.ndarray  # femur + tibia: small only in the joint space between the two bones


def _bones(c: _Canvas, g: KneeGeometry, wobble: np.ndarray) -> _Bones:
    femur = _femur_sdf(g, c.u, c.v, c.z) + wobble
    tibia = _tibia_sdf(g, c.u, c.v, c.z) + wobble
    fibula = _fibula_sdf(g, c.u, c.v, c.z) + 0.5 * wobble
    patella = _patella_sdf(g, c.u, c.v, c.z) + 0.5 * wobble
    return _Bones(femur, tibia, fibula, patella, femur + tibia)


def _paint_leg(c: _Canvas, g: KneeGeometry) -> np.ndarray:
    """Fat filling the leg, then muscle with fatty septa; returns the leg's signed distance."""
    u, v, z, tex = c.u, c.v, c.z, c.tex
    # Leg outline: an axial cross-section like a rounded rectangle, so it narrows only near the slab ends.
    depth_scale = (1.0 - np.clip(np.abs(z) / 1.05, 0.0, 1.0) ** 4) ** 0.25
    # The thigh bulges medially above the knee (vastus medialis); the calf narrows slowly below it.
    bulge = 0.06 * np.exp(-(((v + 0.55) / 0.3) ** 2)) * (u < 0)
    leg_half = g.leg_width * depth_scale * (1.0 - 0.06 * v**2) + bulge + 0.02 * tex["wobble"]
    leg = np.abs(u + 0.02) - leg_half
    c.paint(c.inside(leg), c.textured("fat", 0.05, 0.04))

    # Muscle inside the subcutaneous fat, away from the joint line (fat pads and ligaments there), and all
    # the way down in posterior slices (gastrocnemius heads).
    deep = leg + g.fat_thickness * (1.0 + 0.4 * tex["coarse"])
    zone = 0.16 - 0.3 / (1.0 + np.exp(-(z - 0.4) / 0.1)) + 0.08 * np.abs(u)
    muscle = c.inside(np.maximum(deep, zone - np.abs(v) + 0.05 * tex["coarse"]))
    c.paint(muscle, c.level["muscle"] * (1.0 + 0.06 * tex["medium"] + 0.05 * tex["fine"]))
    septa = np.exp(-((tex["fibres"] / 0.07) ** 2)) * muscle
    c.paint(0.9 * septa, c.level["fat"] * 0.95)
    return leg


def _paint_fluid(c: _Canvas, g: KneeGeometry, bones: _Bones, in_leg: np.ndarray, wobble: np.ndarray) -> None:
    """Joint fluid: a thin layer in the joint space and a few recesses, more with effusion."""
    joint_space = bones.between - (2 * g.cartilage + 0.02 + 0.02 * g.fluid)
    fluid = c.inside(joint_space) * c.inside(np.abs(c.u) - 0.62)
    for pu, pv, pz, ru, rv, rz in g.pockets:
        pocket = _ellipsoid(c.u, c.v, c.z, (pu, pv, pz), (ru * (0.5 + g.fluid), rv * (0.5 + g.fluid), rz))
        fluid = np.maximum(fluid, c.inside(pocket + 0.5 * wobble))
    c.paint(fluid * in_leg, c.textured("fluid", 0.04, 0.02))


def _paint_fibrous(c: _Canvas, g: KneeGeometry, bones: _Bones, in_leg: np.ndarray) -> None:
    """Menisci and ligaments, dark fibrous tissue."""
    u, v, z = c.u, c.v, c.z
    # Menisci: dark wedges filling the widening gap at the periphery of each compartment.
    # Each is a triangle (apex inwards, base at the capsule) clipped by the bones: cartilage, painted later,
    # covers its upper and lower faces.
    apex = 0.5 * sum(g.condyle_offset) + 0.08 * g.size
    rim = g.tibia[0] + 0.035
    slope = 0.1 / (rim - apex)
    wedge = (np.abs(v) - slope * (np.abs(u) - apex)) / math.sqrt(1.0 + slope**2)
    meniscus = _intersect(wedge, np.abs(u) - rim, -bones.femur, -bones.tibia, bones.between - 0.22)
    fibrous = c.inside(meniscus)
    # Collateral ligaments hug the bones at the sides of the joint; cruciates cross the notch.
    bone = np.minimum(bones.femur, bones.tibia)
    collateral = _intersect(np.abs(bone - 0.028) - 0.01, 0.42 - np.abs(u), np.abs(v) - 0.3)
    fibrous = np.maximum(fibrous, c.inside(collateral) * _window(z, -0.35, 0.45))
    acl = _capsule(u, v, (0.07, -0.22), (-0.02, 0.06), 0.022)
    pcl = _capsule(u, v, (-0.06, -0.2), (0.0, 0.1), 0.026)
    fibrous = np.maximum(fibrous, c.inside(acl) * _window(z, -0.25, 0.3))
    fibrous = np.maximum(fibrous, c.inside(pcl) * _window(z, 0.25, 0.65))
    c.paint(fibrous * in_leg, c.level["fibrous"] * (1.0 + 0.3 * c.tex["medium"]))


def _paint_cartilage(c: _Canvas, g: KneeGeometry, bones: _Bones) -> None:
    """Articular cartilage on the weight-bearing surfaces, slightly varying in thickness."""
    thickness = g.cartilage * (1.0 + 0.2 * c.tex["coarse"])
    femoral = c.inside(bones.femur - thickness) * c.inside(-0.22 - c.v)
    tibial = c.inside(bones.tibia - thickness) * c.inside(c.v - g.gap - 0.08)
    tibial = tibial * c.inside(np.abs(c.u) - g.tibia[0] + 0.02)
    c.paint(np.maximum(femoral, tibial), c.textured("cartilage", 0.04, 0.05))


def _paint_bones(c: _Canvas, g: KneeGeometry, bones: _Bones) -> None:
    """A dark cortical shell (thicker along the shafts) around textured marrow, with the faint dark line of
    the closed growth plate."""
    u, v, tex = c.u, c.v, c.tex
    cortex = 0.012 + 0.03 * _smoothstep((np.abs(v) - 0.35) / 0.5)
    trabecular = 1.0 + 0.06 * tex["coarse"] + 0.07 * tex["fine"] - 0.08 * np.abs(tex["medium"])
    marrow_value = c.level["marrow"] * trabecular
    shells = ((bones.femur, -0.36 * g.size), (bones.tibia, 0.28 * g.size), (bones.patella, None),
              (bones.fibula, None))  # fmt: skip
    for sdf, physis in shells:
        c.paint(c.inside(sdf), c.level["cortex"])
        value = marrow_value
        if physis is not None:
            line = np.exp(-(((v - physis - 0.02 * np.sin(9.0 * u)) / 0.008) ** 2))
            value = marrow_value * (1.0 - 0.45 * line)
        c.paint(c.inside(sdf + cortex), value)


def knee_magnitude(
    rng: np.random.Generator,
    geometry: KneeGeometry,
    num_slices: int,
    recon_size: tuple[int, int],
    acquisition: str,
) -> np.ndarray:
    """Relative signal magnitude (fat in PD about 1) of the knee on the (slices, H, W) recon grid.

    Tissues are painted back to front: fat fills the leg, then muscle with fatty septa, joint fluid,
    fibrous structures (menisci, ligaments), cartilage and finally the bones (dark cortex around marrow).
    """
    u, v, z, _, pixel = _coordinates(geometry, num_slices, recon_size)
    shape = (num_slices, *recon_size)
    tex = _textures(rng, shape, pixel)
    jitter = {name: rng.uniform(0.93, 1.07) for name in TISSUE_SIGNAL[acquisition]}
    level = {name: np.float32(value * jitter[name]) for name, value in TISSUE_SIGNAL[acquisition].items()}
    canvas = _Canvas(np.zeros(shape, np.float32), u, v, z, pixel, tex, level)
    wobble = 0.012 * tex["wobble"]  # keeps outlines organic rather than geometric

    leg = _paint_leg(canvas, geometry)
    bones = _bones(canvas, geometry, wobble)
    in_leg = canvas.inside(leg + 0.03)
    _paint_fluid(canvas, geometry, bones, in_leg, wobble)
    _paint_fibrous(canvas, geometry, bones, in_leg)
    _paint_cartilage(canvas, geometry, bones)
    _paint_bones(canvas, geometry, bones)
    return np.clip(canvas.image, 0.0, None)


def _coil_and_phase(
    rng: np.random.Generator, geometry: KneeGeometry, num_slices: int, recon_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth receive-coil shading (falling off towards the top and bottom of the field of view) and a
    smooth image phase (low-order polynomial plus a very smooth random field)."""
    u, _, z, y, pixel = _coordinates(geometry, num_slices, recon_size)
    x = u * geometry.lateral
    c = rng.uniform(-1.0, 1.0, size=6).astype(np.float32)
    shading = 1.0 + 0.1 * c[0] * x + 0.1 * c[1] * y - 0.12 * (x**2 + 0.5 * y**2)
    falloff = 0.5 * (1.0 - np.tanh((np.abs(y) - 0.9) / 0.035))
    coil = np.clip(shading, 0.2, None) * falloff
    p = rng.uniform(-1.0, 1.0, size=6).astype(np.float32)
    smooth = _band_noise(rng, (num_slices, *recon_size), pixel, (0.25, 0.25), 3.0)
    phase = math.pi * (p[0] + 0.4 * p[1] * x + 0.4 * p[2] * y + 0.5 * p[3] * x * y + 0.3 * p[4] * z)
    phase = phase + 0.6 * p[5] * (x**2 - y**2) + 0.5 * smooth
    return coil.astype(np.float32), phase.astype(np.float32)


# ----------------------------------------------------------------------------------------- one volume


def synthesize_volume(
    rng_or_seed: np.random.Generator | int | Sequence[int],
    num_slices: int = DEFAULT_NUM_SLICES,
    recon_size: Sequence[int] = DEFAULT_RECON_SIZE,
    kspace_size: Sequence[int] = DEFAULT_KSPACE_SIZE,
    acquisition: str = KNEE_ACQUISITIONS[0],
    patient_id: str | None = None,
) -> SyntheticVolume:
    """Generate one knee volume in the fastMRI single-coil format.

    Args:
        rng_or_seed: a NumPy generator, or a seed (int or sequence of ints) for ``np.random.default_rng``.
        num_slices: number of coronal slices.
        recon_size: (H, W) of the target ``reconstruction_esc``.
        kspace_size: (KH, KW) of ``kspace``; KH is the oversampled readout (2 H for fastMRI knee).
        acquisition: ``CORPD_FBK`` (proton density) or ``CORPDFS_FBK`` (fat suppressed).
        patient_id: stored in the attributes; drawn from the generator when None.

    Returns:
        ``SyntheticVolume(kspace, target, header_xml, attrs)``: complex64 k-space (zero outside the acquired
        phase-encoding band), the float32 target derived from it as fastMRI does, the ISMRMRD header and
        the attributes ``acquisition``, ``max``, ``norm`` and ``patient_id``.
    """
    num_slices, recon, kspace_hw = _check_shapes(num_slices, recon_size, kspace_size)
    if acquisition not in KNEE_ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {KNEE_ACQUISITIONS}, got {acquisition!r}")
    rng = np.random.default_rng(rng_or_seed)
    geometry = draw_geometry(rng)
    magnitude = knee_magnitude(rng, geometry, num_slices, recon, acquisition)
    coil, phase = _coil_and_phase(rng, geometry, num_slices, recon)
    scale = math.exp(rng.uniform(*np.log(SIGNAL_SCALE_RANGE)))
    image = (scale * magnitude * coil) * np.exp(1j * phase)

    # The object fills the recon field of view, i.e. the centre of the oversampled matrix, exactly where
    # fastMRI's centre crop takes the target from.
    canvas = np.zeros((num_slices, *kspace_hw), np.complex64)
    top, left = _crop_offsets(kspace_hw, recon)
    canvas[:, top : top + recon[0], left : left + recon[1]] = image
    kspace = _fft2c(canvas)
    pe_center, pe_maximum, pad_left, pad_right = acquired_band(kspace_hw[1])
    kspace[..., :pad_left] = 0
    kspace[..., pad_right:] = 0
    sigma = scale * rng.uniform(*NOISE_RANGE[acquisition]) / math.sqrt(2)
    band_shape = (num_slices, kspace_hw[0], pad_right - pad_left)
    noise = rng.standard_normal(band_shape, dtype=np.float32) + 1j * rng.standard_normal(
        band_shape, np.float32
    )
    kspace[..., pad_left:pad_right] += np.float32(sigma) * noise
    kspace = kspace.astype(np.complex64)

    target = reconstruction_esc(kspace, recon)
    header = build_ismrmrd_header((*kspace_hw, 1), (*recon, 1), pe_center, pe_maximum)
    attrs = {
        "acquisition": acquisition,
        "max": float(target.max()),
        "norm": float(np.linalg.norm(target.astype(np.float64))),
        "patient_id": patient_id if patient_id is not None else rng.bytes(32).hex(),
    }
    return SyntheticVolume(kspace, target, header, attrs)


# ------------------------------------------------------------------------------------------ a dataset


def volume_acquisition(split: str, index: int) -> str:
    """Contrasts alternate within a split (val starts with the other one), so both are always present."""
    return KNEE_ACQUISITIONS[(index + SPLITS.index(split)) % len(KNEE_ACQUISITIONS)]


def volume_patient_id(
    seed: int, split: str, index: int, num_slices: int, recon_size: Sequence[int], kspace_size: Sequence[int]
) -> str:
    """A fastMRI-like hex patient id that fingerprints everything the volume's content depends on."""
    key = (
        f"synthetic-knee v{GENERATOR_VERSION} seed={seed} split={split} index={index} slices={num_slices} "
        f"recon={tuple(recon_size)} kspace={tuple(kspace_size)}"
    )
    return hashlib.sha256(key.encode()).hexdigest()


def _is_complete(path: Path, patient_id: str, kspace_shape: tuple[int, ...], target_shape: tuple[int, ...]):
    """True when path is a readable volume written for exactly these parameters."""
    try:
        with h5py.File(path, "r") as hf:
            return (
                hf[KSPACE_KEY].shape == kspace_shape
                and hf[TARGET_KEY].shape == target_shape
                and HEADER_KEY in hf
                and all(key in hf.attrs for key in REQUIRED_ATTRS)
                and str(hf.attrs["patient_id"]) == patient_id
            )
    except (OSError, KeyError):
        return False


def generate_dataset(
    root: str | Path,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    num_slices: int = DEFAULT_NUM_SLICES,
    recon_size: Sequence[int] = DEFAULT_RECON_SIZE,
    kspace_size: Sequence[int] = DEFAULT_KSPACE_SIZE,
    seed: int = 0,
    num_test: int = 0,
) -> list[Path]:
    """Write a synthetic fastMRI single-coil knee dataset under ``root``.

    Files are ``root/singlecoil_{train,val,test}/synthetic_{split}_{index:04d}.h5``; the test split has
    targets like the others (a held-out split for the final evaluation, not fastMRI's target-less one).
    Each volume's content depends only on (seed, split, index) and the sizes. The call is idempotent: a
    complete file already written for the same parameters is left untouched, anything else under that name
    (partial, stale, other parameters) is rewritten atomically. Files of other names (e.g. from a larger
    earlier run) are not removed.

    Args:
        root: data root (created if needed).
        num_train: volumes in ``singlecoil_train`` (0 writes none).
        num_val: volumes in ``singlecoil_val`` (0 writes none).
        num_slices: slices per volume.
        recon_size: (H, W) of the targets.
        kspace_size: (KH, KW) of the k-space, at least ``recon_size``.
        seed: dataset seed (>= 0).
        num_test: volumes in ``singlecoil_test`` (0 writes none).

    Returns:
        The paths of the volumes, train first, then val and test, in index order.
    """
    counts = {
        "train": _check_int("num_train", num_train, 0),
        "val": _check_int("num_val", num_val, 0),
        "test": _check_int("num_test", num_test, 0),
    }
    num_slices, recon, kspace_hw = _check_shapes(num_slices, recon_size, kspace_size)
    seed = _check_int("seed", seed, 0)
    paths = []
    for split in SPLITS:
        if counts[split] == 0:
            continue
        split_dir = Path(root) / f"singlecoil_{split}"
        split_dir.mkdir(parents=True, exist_ok=True)
        for index in range(counts[split]):
            path = split_dir / f"synthetic_{split}_{index:04d}.h5"
            patient_id = volume_patient_id(seed, split, index, num_slices, recon, kspace_hw)
            if not _is_complete(path, patient_id, (num_slices, *kspace_hw), (num_slices, *recon)):
                volume = synthesize_volume(
                    volume_rng(seed, split, index),
                    num_slices,
                    recon,
                    kspace_hw,
                    volume_acquisition(split, index),
                    patient_id=patient_id,
                )
                write_volume(path, volume.kspace, volume.header_xml, volume.attrs, volume.target)
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- preview


def _volume_files(root_or_files: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(root_or_files, (str, Path)):
        root = Path(root_or_files)
        return sorted(root.rglob("*.h5")) if root.is_dir() else [root]
    return [Path(path) for path in root_or_files]


def render_preview(
    root_or_files: str | Path | Iterable[str | Path],
    out_png: str | Path,
    num_volumes: int = 4,
    slice_fractions: Sequence[float] = (0.3, 0.5, 0.7),
) -> Path:
    """Draw target slices of a few volumes (alternating contrasts) into a PNG.

    Args:
        root_or_files: a data root (searched recursively for ``.h5``), one file, or a list of files.
        out_png: the picture to write (parent directories are created).
        num_volumes: rows of the picture, one volume each.
        slice_fractions: which slices of each volume to show, as fractions of its depth.

    Returns:
        The path of the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_contrast: dict[str, list[Path]] = {}
    for path in _volume_files(root_or_files):
        with h5py.File(path, "r") as hf:
            if TARGET_KEY in hf:
                by_contrast.setdefault(str(hf.attrs.get("acquisition", "?")), []).append(path)
    # Interleave the contrasts so both appear even in a short preview.
    groups = [by_contrast[key] for key in sorted(by_contrast)]
    chosen = [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]
    chosen = chosen[:num_volumes]
    if not chosen:
        raise ValueError(f"no volume with a {TARGET_KEY} target found in {root_or_files}")

    cols = len(slice_fractions)
    figure = Figure(figsize=(2.8 * cols, 2.95 * len(chosen)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(chosen), cols, squeeze=False)
    for row, path in zip(axes, chosen, strict=True):
        with h5py.File(path, "r") as hf:
            target = hf[TARGET_KEY]
            picks = sorted({min(int(f * target.shape[0]), target.shape[0] - 1) for f in slice_fractions})
            images = [target[i] for i in picks]
            acquisition = str(hf.attrs.get("acquisition", "?"))
            vmax = float(np.percentile(np.stack(images), 99.7))
        for ax in row:
            ax.set_axis_off()
        for ax, index, image in zip(row, picks, images, strict=False):
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=vmax)
            ax.set_title(f"{acquisition} · {path.stem} · slice {index}", fontsize=7)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


# ---------------------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mri_models.data.synthetic",
        description="Write a deterministic synthetic knee dataset in the fastMRI single-coil format.",
    )
    parser.add_argument("--root", type=Path, required=True, help="data root to write the splits under")
    parser.add_argument("--train", type=int, default=DEFAULT_NUM_TRAIN, help="training volumes")
    parser.add_argument("--val", type=int, default=DEFAULT_NUM_VAL, help="validation volumes")
    parser.add_argument(
        "--test", type=int, default=DEFAULT_NUM_TEST, help="held-out test volumes (with targets)"
    )
    parser.add_argument("--slices", type=int, default=DEFAULT_NUM_SLICES, help="slices per volume")
    parser.add_argument("--recon", type=int, nargs=2, metavar=("H", "W"), default=DEFAULT_RECON_SIZE)
    parser.add_argument("--kspace", type=int, nargs=2, metavar=("KH", "KW"), default=DEFAULT_KSPACE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", type=Path, help="also draw a few target slices into this PNG")
    args = parser.parse_args(argv)
    # Check here too so that errors name the command-line flags.
    counts = (("--train", args.train, 0), ("--val", args.val, 0), ("--test", args.test, 0),
              ("--slices", args.slices, 1))  # fmt: skip
    for flag, value, minimum in counts:
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if min(args.recon) < MIN_RECON_SIZE:
        parser.error(f"--recon must be at least {MIN_RECON_SIZE} in both dimensions, got {args.recon}")
    if args.kspace[0] < args.recon[0] or args.kspace[1] < args.recon[1]:
        parser.error(f"--kspace {args.kspace} must be at least --recon {args.recon} in both dimensions")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    start = time.perf_counter()
    paths = generate_dataset(
        args.root, args.train, args.val, args.slices, tuple(args.recon), tuple(args.kspace), args.seed,
        num_test=args.test,
    )
    print(f"{len(paths)} volumes under {args.root} ({time.perf_counter() - start:.1f} s)")
    if args.preview is not None:
        print(f"preview: {render_preview(paths, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
