"""Render one axial head-CT slice of a synthetic patient in Hounsfield units.

Air, scalp, skull with diploe, grey and white matter with smooth texture,
sulcal CSF, ventricles, falx, occasional physiological calcifications, the
lesion and correlated noise.
"""

from __future__ import annotations

import math

import numpy as np

from simulations.synth.anatomy import _Blob, _Crescent, _Patient
from simulations.synth.profiles import SiteProfile

# Distance (mm) from the widest axial level of the head at which it closes.
_HEAD_HALF_HEIGHT_MM = 115.0


def _soft(distance_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Soft indicator of ``distance > 0`` with a transition about ``2 * edge_mm`` wide."""
    return 0.5 * (1.0 + np.tanh(distance_mm / edge_mm))


def _ray_distance(xr: np.ndarray, yr: np.ndarray, a: float, b: float) -> np.ndarray:
    """Signed distance (mm, positive inside) to an axis-aligned ellipse, along its centre's ray."""
    r_point = np.hypot(xr, yr)
    rho = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    r_ellipse = np.where(rho > 1e-9, r_point / np.maximum(rho, 1e-9), min(a, b))
    return r_ellipse - r_point


def _render_hu(patient: _Patient, *, z: float, profile: SiteProfile, size: int, spacing: float,
               rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Render one axial slice in HU and return it with its label."""
    coords = ((np.arange(size) - (size - 1) / 2.0) * spacing).astype(np.float32)
    x = coords[np.newaxis, :]  # patient left-right (columns)
    y = coords[:, np.newaxis]  # anterior (top) to posterior (rows)
    cos_t, sin_t = math.cos(patient.angle), math.sin(patient.angle)
    xr = cos_t * (x - patient.cx) + sin_t * (y - patient.cy)
    yr = -sin_t * (x - patient.cx) + cos_t * (y - patient.cy)
    edge = max(0.45 * spacing, 0.3)

    shrink = math.sqrt(max(1.0 - (z / _HEAD_HALF_HEIGHT_MM) ** 2, 0.25))
    a, b = patient.head_a * shrink, patient.head_b * shrink
    d_head = _ray_distance(xr, yr, a, b)
    # The dome is cut obliquely higher up, so the skull looks thicker there.
    skull = patient.skull_mm * (1.0 + 0.3 * (1.0 - shrink))
    d_skull = d_head - patient.scalp_mm
    d_brain = d_skull - skull

    # Brain: white matter, cortical grey band, thin sulcal CSF at the surface.
    brain = patient.white_hu + (patient.gray_hu - patient.white_hu) * _soft(patient.cortex_mm - d_brain, 1.2)
    sulcal = _soft(patient.sulcal_mm - d_brain, 0.6)
    brain = brain * (1.0 - sulcal) + patient.csf_hu * sulcal
    # Smooth texture: a sum of plane waves, evaluated separably as matrix products.
    tex = patient.texture.astype(np.float32)
    u = tex[:, 0, None] * coords[None, :] + (tex[:, 2] * z + tex[:, 3])[:, None]
    v = tex[:, 1, None] * coords[None, :]
    amp = tex[:, 4, None]
    brain = brain + (np.cos(v).T @ (amp * np.cos(u)) - np.sin(v).T @ (amp * np.sin(u)))

    # Lateral ventricles: two ellipses diverging anteriorly, largest at vent_z.
    vent_size = max(0.0, 1.0 - ((z - patient.vent_z_mm) / 22.0) ** 2)
    if vent_size > 0.05:
        scale = math.sqrt(vent_size)
        w, length = patient.vent_width_mm * scale, patient.vent_length_mm * scale
        vent = np.zeros_like(brain)
        for side in (-1.0, 1.0):
            ang = side * math.radians(12.0)
            ca, sa = math.cos(ang), math.sin(ang)
            dx, dy = xr - side * patient.vent_sep_mm * scale, yr + 4.0
            vx, vy = ca * dx + sa * dy, -sa * dx + ca * dy
            vent = np.maximum(vent, _soft(_ray_distance(vx, vy, w, length), edge))
        brain = brain * (1.0 - vent) + patient.csf_hu * vent
        gap = length + 4.0
    else:
        gap = 0.0
    # Falx: a faint hyperdense midline, interrupted around the ventricles.
    falx = np.exp(-0.5 * (xr / 0.8) ** 2) * _soft(np.abs(yr + 4.0) - gap, 2.0)
    brain = brain + 12.0 * falx

    for cx, cy, cz, radius, calc_hu in patient.calcifications:
        if abs(z - cz) < radius:
            r_cut = math.sqrt(radius**2 - (z - cz) ** 2)
            blob = _soft(r_cut - np.hypot(xr - cx, yr - cy), edge)
            brain = brain * (1.0 - blob) + calc_hu * blob

    label = 0
    lesion = patient.lesion
    if lesion is not None:
        frac = lesion.visible_fraction(z)
        if frac >= lesion.min_visible_fraction:
            label = 1
            brain = brain + _lesion_hu(lesion, frac, xr, yr, d_brain, a, b, patient, skull, edge)

    # Scalp: subcutaneous fat under a thin skin layer.
    scalp = -70.0 + 110.0 * _soft(1.5 - d_head, 0.5)
    # Bone: dense tables with a less dense diploe in between.
    depth = np.clip(d_skull / skull, 0.0, 1.0)
    bone = patient.bone_hu - patient.diploe_drop_hu * np.exp(-(((depth - 0.5) / 0.22) ** 2))

    hu = -1000.0 + _soft(d_head, edge) * (scalp + 1000.0)
    m_skull = _soft(d_skull, edge)
    hu = hu * (1.0 - m_skull) + bone * m_skull
    m_brain = _soft(d_brain, edge)
    hu = hu * (1.0 - m_brain) + brain * m_brain
    hu = hu + profile.hu_offset

    # Mildly correlated noise, as filtered back-projection gives.
    white = rng.standard_normal((size + 1, size + 1), dtype=np.float32)
    noise = (white[1:, 1:] + 0.5 * white[:-1, 1:] + 0.5 * white[1:, :-1]) / math.sqrt(1.5)
    hu = hu + profile.noise_hu * patient.noise_scale * noise
    return hu, label


def _lesion_hu(lesion: _Blob | _Crescent, frac: float, xr: np.ndarray, yr: np.ndarray, d_brain: np.ndarray,
               a: float, b: float, patient: _Patient, skull: float, edge: float) -> np.ndarray:
    """Return the HU added by the lesion at one slice (``frac`` = relative cut size)."""
    inside_brain = d_brain > 0
    if isinstance(lesion, _Crescent):
        theta = np.arctan2(yr / b, xr / a)
        off = (theta - lesion.arc_center + np.pi) % (2 * np.pi) - np.pi
        taper = np.clip(np.cos(0.5 * np.pi * off / lesion.arc_width), 0.0, 1.0) ** 0.7
        taper = np.where(np.abs(off) < lesion.arc_width, taper, 0.0)
        thickness = lesion.thickness_mm * frac * taper
        mask = _soft(thickness - d_brain, edge) * (thickness > 0.3) * inside_brain
        return lesion.contrast_hu * mask
    # Blob: centre given as a fraction of the room left between the middle of
    # the brain and a margin of (radius + 5 mm) from the inner skull.
    inner = patient.scalp_mm + skull
    phi = math.atan2(lesion.rel_y, lesion.rel_x)
    ray = 1.0 / math.sqrt((math.cos(phi) / a) ** 2 + (math.sin(phi) / b) ** 2) - inner
    ray = max(ray - lesion.radius_mm - 5.0, 0.0)
    rho = math.hypot(lesion.rel_x, lesion.rel_y)
    cx, cy = rho * ray * math.cos(phi), rho * ray * math.sin(phi)
    ca, sa = math.cos(lesion.angle), math.sin(lesion.angle)
    dx, dy = xr - cx, yr - cy
    lx, ly = ca * dx + sa * dy, -sa * dx + ca * dy
    radius = lesion.radius_mm * frac
    lobes = 1.0 + lesion.lobulation * np.cos(3.0 * np.arctan2(ly, lx) + lesion.lobe_phase)
    dist = _ray_distance(lx, ly, radius, radius * lesion.aspect) + (lobes - 1.0) * radius
    core = _soft(dist, max(edge, 0.8))
    added = lesion.contrast_hu * core
    if lesion.edema_hu > 0:
        halo = _soft(dist + lesion.edema_mm, 1.0) - core
        added = added - lesion.edema_hu * halo
    return added * inside_brain
