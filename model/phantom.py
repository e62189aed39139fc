"""Deterministic synthetic chest CT phantoms, with or without a lung nodule.

Nothing can be downloaded here and no labelled data may leave a hospital, so
the built-in model is trained on these. The phantom is a 3D model in
millimetres (body, subcutaneous fat, two lungs, heart, spine, ribs and a tree
of lung vessels) that is sampled on any grid: `phantom_volume` samples every
slice of a series, `phantom_slice` one axial plane. Sampling the same 3D model
for both keeps 2D training slices and 3D test studies alike.

Vessels matter: seen end-on they are bright dots in the lung, like a small
nodule. Without them a classifier only has to find "anything bright in the
lung", and would fire on every vessel of a real scan.

Everything is drawn from a numpy Generator, so a seed gives the same image on
every machine (numpy's PCG64 and its float ops are platform independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -850.0
BONE_HU = 700.0

# Nodule radii in mm: 8-20 mm nodules, the ones follow-up guidelines act on.
# Smaller ones are no bigger than a vessel seen end-on at the model's ~2.8 mm
# pixels (vessels here are <= 2 mm in radius), so no label could be trusted.
NODULE_RADIUS_MM = (4.0, 10.0)

SeedLike = int | np.random.Generator | np.random.SeedSequence


def as_generator(rng_or_seed: SeedLike) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    ax: float  # semi-axis along x (columns), mm
    ay: float  # semi-axis along y (rows), mm


@dataclass(frozen=True)
class _Segment:
    p0: np.ndarray  # (x, y, z) mm
    p1: np.ndarray
    radius: float
    hu: float


@dataclass(frozen=True)
class _Nodule:
    center: np.ndarray  # (x, y, z) mm
    inv_axes: np.ndarray  # 3x3: rotation / semi-axes, maps offsets to the unit ball
    radius: float  # mean radius, mm
    hu: float


@dataclass(frozen=True)
class _Anatomy:
    body: _Ellipse
    fat_mm: float
    lungs: tuple[_Ellipse, _Ellipse]
    lung_z_center: float
    lung_z_half: float
    heart: _Ellipse
    spine: _Ellipse
    ribs: tuple[tuple[float, float, float], ...]  # (angle rad, semi-axis scale, radius mm)
    vessels: tuple[_Segment, ...]
    nodule: _Nodule | None
    noise_hu: float


def _lung_scale(anat: _Anatomy, z: float) -> float:
    """Lung cross-section scale at height z: 0 outside, small at apex and base."""
    t = (z - anat.lung_z_center) / anat.lung_z_half
    if abs(t) >= 1.0:
        return 0.0
    return 0.35 + 0.65 * float(np.sqrt(1.0 - t * t))


def _sample_anatomy(
    rng: np.random.Generator, fov_x: float, fov_y: float, z_extent: float, lesion: bool
) -> _Anatomy:
    # Body fits the field of view with a margin, as a well-centred scan would.
    ax = min(rng.uniform(140.0, 175.0), 0.46 * fov_x)
    ay = min(ax * rng.uniform(0.62, 0.78), 0.46 * fov_y)
    body = _Ellipse(rng.uniform(-0.04, 0.04) * fov_x, rng.uniform(-0.03, 0.03) * fov_y, ax, ay)
    fat = rng.uniform(5.0, 18.0)
    lungs = []
    for side in (-1.0, 1.0):
        lax = ax * rng.uniform(0.30, 0.36)
        lay = ay * rng.uniform(0.62, 0.74)
        lungs.append(_Ellipse(body.cx + side * ax * rng.uniform(0.42, 0.50),
                              body.cy - ay * rng.uniform(0.02, 0.10), lax, lay))
    heart = _Ellipse(body.cx + ax * rng.uniform(0.0, 0.10), body.cy - ay * rng.uniform(0.05, 0.2),
                     ax * rng.uniform(0.18, 0.26), ay * rng.uniform(0.28, 0.38))
    spine = _Ellipse(body.cx, body.cy + ay * rng.uniform(0.62, 0.72),
                     rng.uniform(13.0, 19.0), rng.uniform(12.0, 17.0))
    ribs = tuple(
        (float(a + rng.normal(0.0, 0.05)), float(rng.uniform(0.90, 0.95)),
         float(rng.uniform(3.5, 6.0)))
        for a in np.linspace(0.25 * np.pi, 1.75 * np.pi, int(rng.integers(8, 13)))
    )
    lung_z_half = max(rng.uniform(110.0, 150.0), 0.6 * z_extent)
    lung_z_center = rng.uniform(-0.2, 0.2) * z_extent

    vessels: list[_Segment] = []
    for lung, side in zip(lungs, (-1.0, 1.0), strict=True):
        # Hilum: the medial side of each lung, where the vessel tree starts.
        hilum = np.array([lung.cx - side * 0.55 * lung.ax, lung.cy, lung_z_center])
        for _ in range(int(rng.integers(10, 22))):
            start = hilum + rng.normal(0.0, [4.0, 8.0, 0.3 * lung_z_half])
            direction = rng.normal(0.0, 1.0, 3) + np.array([side * 1.2, 0.0, 0.0])
            direction /= np.linalg.norm(direction)
            length = rng.uniform(30.0, 90.0)
            radius = rng.uniform(0.8, 2.0)
            hu = rng.uniform(-150.0, 40.0)
            end = start + length * direction
            vessels.append(_Segment(start, end, radius, hu))
            # One generation of branches: thinner, dimmer (partial volume).
            for _ in range(int(rng.integers(1, 4))):
                fork = start + rng.uniform(0.3, 0.9) * (end - start)
                bdir = direction + rng.normal(0.0, 0.8, 3)
                bdir /= np.linalg.norm(bdir)
                thin = radius * rng.uniform(0.45, 0.75)
                dim = hu - rng.uniform(50.0, 250.0)
                vessels.append(_Segment(fork, fork + rng.uniform(15.0, 45.0) * bdir, thin, dim))

    nodule = None
    if lesion:
        nodule = _sample_nodule(rng, lungs, heart, lung_z_center, lung_z_half, z_extent)
    noise = rng.uniform(12.0, 30.0)
    return _Anatomy(body, fat, (lungs[0], lungs[1]), lung_z_center, lung_z_half, heart, spine,
                    ribs, tuple(vessels), nodule, noise)


def _sample_nodule(
    rng: np.random.Generator, lungs: list[_Ellipse], heart: _Ellipse, zc: float, zhalf: float,
    z_extent: float,
) -> _Nodule:
    radius = rng.uniform(*NODULE_RADIUS_MM)
    side = int(rng.integers(0, 2))
    # Inside the scanned range (whole, if it fits), where the lung is wide
    # enough to hold it.
    half = max(0.5 * z_extent - radius, 0.0)
    lo, hi = max(zc - 0.6 * zhalf, -half), min(zc + 0.6 * zhalf, half)
    nodule_z = rng.uniform(lo, hi) if lo < hi else float(np.clip(zc, -half, half))
    t = (nodule_z - zc) / zhalf
    scale = 0.35 + 0.65 * float(np.sqrt(max(0.0, 1.0 - t * t)))
    # Inside the lung, clear of the pleura, and not where the heart covers the
    # lung ellipse: a nodule there would be soft tissue on soft tissue, invisible
    # and a wrong label. Rejection sampling; the lateral lung as a fallback.
    margin = radius + 3.0
    lung = lungs[side]
    x, y = lung.cx + (0.5 if side else -0.5) * scale * lung.ax, lung.cy
    for _ in range(64):
        cx = lung.cx + rng.uniform(-1.0, 1.0) * scale * lung.ax
        cy = lung.cy + rng.uniform(-1.0, 1.0) * scale * lung.ay
        px, py = np.array([cx]), np.array([cy])
        if (_ellipse_depth(lung, px, py, scale)[0] >= margin
                and _ellipse_depth(heart, px, py)[0] <= -margin):
            x, y = cx, cy
            break
    # Roughly spherical: random semi-axes within +-20 % and a random rotation.
    axes = radius * rng.uniform(0.8, 1.2, 3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    inv_axes = (q / axes).T  # row i: q[:, i] / axes[i]
    return _Nodule(np.array([x, y, nodule_z]), inv_axes, radius, rng.uniform(10.0, 60.0))


def _soft(distance_inside: np.ndarray, edge_mm: float) -> np.ndarray:
    """0..1 partial-volume weight from a signed distance (mm, positive inside)."""
    return np.clip(0.5 + distance_inside / edge_mm, 0.0, 1.0)


def _ellipse_depth(e: _Ellipse, x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Approximate signed distance to an ellipse boundary in mm, positive inside."""
    r = np.sqrt(((x - e.cx) / (e.ax * scale)) ** 2 + ((y - e.cy) / (e.ay * scale)) ** 2)
    return (1.0 - r) * min(e.ax, e.ay) * scale


def _render_plane(
    anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float
) -> np.ndarray:
    """HU of the plane at height z, noise-free. x, y: (rows, cols) mm grids."""
    edge = max(pixel_mm, 0.5)
    body_w = _soft(_ellipse_depth(anat.body, x, y), edge)
    img = AIR_HU + (FAT_HU - AIR_HU) * body_w
    inner = _Ellipse(anat.body.cx, anat.body.cy, anat.body.ax - anat.fat_mm,
                     anat.body.ay - anat.fat_mm)
    img += (SOFT_TISSUE_HU - FAT_HU) * _soft(_ellipse_depth(inner, x, y), edge)

    scale = _lung_scale(anat, z)
    lung_w = np.zeros_like(x)
    if scale > 0.0:
        for lung in anat.lungs:
            lung_w = np.maximum(lung_w, _soft(_ellipse_depth(lung, x, y, scale), edge))
        heart_w = _soft(_ellipse_depth(anat.heart, x, y), edge)
        lung_w *= 1.0 - heart_w
    img += (LUNG_HU - SOFT_TISSUE_HU) * lung_w

    # Vessels: tubes around 3D segments, drawn only inside the lung.
    for seg in anat.vessels:
        _draw_segment(img, lung_w, seg, x, y, z, edge)

    if anat.nodule is not None:
        nod = anat.nodule
        bbox = nod.radius * 1.3 + 2 * edge
        if abs(z - nod.center[2]) < bbox:
            sl = _bbox_slices(x, y, nod.center[0], nod.center[1], bbox)
            if sl is not None:
                off = np.stack([x[sl] - nod.center[0], y[sl] - nod.center[1],
                                np.full_like(x[sl], z - nod.center[2])], axis=-1)
                r = np.linalg.norm(off @ nod.inv_axes.T, axis=-1)
                w = _soft((1.0 - r) * nod.radius, edge)
                img[sl] = img[sl] * (1.0 - w) + nod.hu * w

    bone = _soft(_ellipse_depth(anat.spine, x, y), edge)
    for angle, s, rr in anat.ribs:
        a = angle + 0.004 * z  # ribs slope: their cross-sections move with z
        cx = anat.body.cx + s * (anat.body.ax - anat.fat_mm) * np.sin(a)
        cy = anat.body.cy - s * (anat.body.ay - anat.fat_mm) * np.cos(a)
        sl = _bbox_slices(x, y, cx, cy, rr * 1.6 + 2 * edge)
        if sl is not None:
            rib = _soft(_ellipse_depth(_Ellipse(cx, cy, rr * 1.6, rr), x[sl], y[sl]), edge)
            np.maximum(bone[sl], rib, out=bone[sl])
    img = img * (1.0 - bone) + BONE_HU * bone
    return img


def _bbox_slices(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, half: float
) -> tuple[slice, slice] | None:
    cols = np.nonzero(np.abs(x[0] - cx) <= half)[0]
    rows = np.nonzero(np.abs(y[:, 0] - cy) <= half)[0]
    if cols.size == 0 or rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _draw_segment(
    img: np.ndarray, lung_w: np.ndarray, seg: _Segment, x: np.ndarray, y: np.ndarray, z: float,
    edge: float,
) -> None:
    reach = seg.radius + 2 * edge
    if z < min(seg.p0[2], seg.p1[2]) - reach or z > max(seg.p0[2], seg.p1[2]) + reach:
        return
    # Only the part of the segment near this plane can touch it.
    d = seg.p1 - seg.p0
    lo, hi = 0.0, 1.0
    if abs(d[2]) > 1e-6:
        t0, t1 = sorted(((z - reach - seg.p0[2]) / d[2], (z + reach - seg.p0[2]) / d[2]))
        lo, hi = max(lo, t0), min(hi, t1)
    if lo > hi:
        return
    a, b = seg.p0 + lo * d, seg.p0 + hi * d
    cx, cy = 0.5 * (a[0] + b[0]), 0.5 * (a[1] + b[1])
    half = 0.5 * max(abs(a[0] - b[0]), abs(a[1] - b[1])) + reach
    sl = _bbox_slices(x, y, cx, cy, half)
    if sl is None:
        return
    px, py = x[sl] - seg.p0[0], y[sl] - seg.p0[1]
    pz = z - seg.p0[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / float(d @ d), 0.0, 1.0)
    dist = np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2)
    w = _soft(seg.radius - dist, edge) * lung_w[sl]
    img[sl] = img[sl] * (1.0 - w) + seg.hu * w


def _grid(rows: int, cols: int, spacing_yx: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    ys = (np.arange(rows) - (rows - 1) / 2.0) * spacing_yx[0]
    xs = (np.arange(cols) - (cols - 1) / 2.0) * spacing_yx[1]
    x, y = np.meshgrid(xs, ys)
    return x, y


def _finish(img: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    img = img + rng.normal(0.0, noise_hu, img.shape)
    return np.clip(np.round(img), -1024, 3071).astype(np.int16)


def phantom_volume(
    rng_or_seed: SeedLike,
    n_slices: int = 40,
    rows: int = 256,
    cols: int = 256,
    spacing: tuple[float, float, float] = (2.5, 1.4, 1.4),
    lesion: bool = False,
) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """A chest CT volume in HU, int16 (z, y, x), and the nodule centre voxel (z, y, x).

    Slice k lies at z = (k - (n_slices - 1) / 2) * spacing[0] mm; rows grow
    posterior and columns towards the patient's left, as in an LPS axial series.
    With `lesion`, one nodule (radius 4-10 mm) lies inside a lung within the
    scanned range, so it spans several slices.
    """
    rng = as_generator(rng_or_seed)
    sz, sy, sx = spacing
    anat = _sample_anatomy(rng, cols * sx, rows * sy, n_slices * sz, lesion)
    x, y = _grid(rows, cols, (sy, sx))
    zs = (np.arange(n_slices) - (n_slices - 1) / 2.0) * sz
    vol = np.empty((n_slices, rows, cols), dtype=np.int16)
    for k, z in enumerate(zs):
        vol[k] = _finish(_render_plane(anat, x, y, float(z), min(sy, sx)), rng, anat.noise_hu)
    center = None
    if anat.nodule is not None:
        nx, ny, nz = anat.nodule.center
        center = (
            int(round(nz / sz + (n_slices - 1) / 2.0)),
            int(round(ny / sy + (rows - 1) / 2.0)),
            int(round(nx / sx + (cols - 1) / 2.0)),
        )
    return vol, center


def phantom_nodule_mask(
    seed: int | np.random.SeedSequence,
    n_slices: int = 40,
    rows: int = 256,
    cols: int = 256,
    spacing: tuple[float, float, float] = (2.5, 1.4, 1.4),
) -> np.ndarray:
    """The true extent of the nodule of `phantom_volume(seed, ..., lesion=True)`.

    A boolean (z, y, x) volume on the same grid, True inside the nodule's
    ellipsoid: the ground truth a located region is measured against. Takes
    a seed, not a Generator, since it replays the same draws.
    """
    rng = as_generator(seed)
    sz, sy, sx = spacing
    anat = _sample_anatomy(rng, cols * sx, rows * sy, n_slices * sz, True)
    assert anat.nodule is not None
    x, y = _grid(rows, cols, (sy, sx))
    zs = (np.arange(n_slices) - (n_slices - 1) / 2.0) * sz
    nod = anat.nodule
    mask = np.zeros((n_slices, rows, cols), dtype=bool)
    for k, z in enumerate(zs):
        off = np.stack([x - nod.center[0], y - nod.center[1], np.full_like(x, z - nod.center[2])],
                       axis=-1)
        mask[k] = np.linalg.norm(off @ nod.inv_axes.T, axis=-1) <= 1.0
    return mask


def phantom_slice(
    rng_or_seed: SeedLike,
    rows: int = 256,
    cols: int = 256,
    spacing: tuple[float, float] = (1.4, 1.4),
    lesion: bool = False,
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """One axial chest slice in HU, int16 (y, x), and the nodule centre pixel (y, x).

    The plane is drawn at a random height through the lungs; with `lesion` it
    cuts the nodule within half a radius of its centre, so the nodule is seen
    at >= 87 % of its full diameter: a label a reader would agree with.
    """
    rng = as_generator(rng_or_seed)
    sy, sx = spacing
    anat = _sample_anatomy(rng, cols * sx, rows * sy, 200.0, lesion)
    if anat.nodule is not None:
        z = float(anat.nodule.center[2] + rng.uniform(-0.5, 0.5) * anat.nodule.radius)
    else:
        z = float(anat.lung_z_center + rng.uniform(-0.6, 0.6) * anat.lung_z_half)
    x, y = _grid(rows, cols, (sy, sx))
    img = _finish(_render_plane(anat, x, y, z, min(sy, sx)), rng, anat.noise_hu)
    center = None
    if anat.nodule is not None:
        nx, ny, _ = anat.nodule.center
        center = (int(round(ny / sy + (rows - 1) / 2.0)), int(round(nx / sx + (cols - 1) / 2.0)))
    return img, center


# --- Projection radiographs (CR/DX) -------------------------------------------------


def _band_weight(dist_mm: np.ndarray, half_width: float, edge: float) -> np.ndarray:
    return _soft(half_width - np.abs(dist_mm), edge)


def phantom_radiograph(
    rng_or_seed: SeedLike,
    rows: int = 256,
    cols: int = 256,
    spacing: tuple[float, float] = (1.7, 1.7),
    lesion: bool = False,
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """A PA chest radiograph, uint16 (y, x), brighter = more attenuation (MONOCHROME2).

    Built as a map of projected attenuation: torso, two air-filled lungs
    (darker), heart and spine (brighter), ribs crossing the lung fields as
    curved bands and clavicles; with `lesion`, a nodule (radius 5-15 mm,
    projected as a sphere) in a lung field, clear of the heart. Detector gain,
    offset, gamma and noise vary, as between X-ray systems; the model's
    "histogram" contrast normalises them.
    """
    rng = as_generator(rng_or_seed)
    sy, sx = spacing
    x, y = _grid(rows, cols, (sy, sx))
    h, w = rows * sy, cols * sx
    edge = max(min(sy, sx), 0.5)

    # Torso: a projected cylinder, its thickness falling towards the sides.
    half_w = rng.uniform(0.40, 0.47) * w
    cx = rng.uniform(-0.03, 0.03) * w
    t = np.clip(1.0 - ((x - cx) / half_w) ** 2, 0.0, None)
    atten = 1.0 * np.sqrt(t) * _soft(y + 0.55 * h, 3 * edge)  # shoulders at the top

    # Lungs: tall ellipses, air reduces attenuation; apex narrower than base.
    top = -rng.uniform(0.30, 0.38) * h
    bottom = rng.uniform(0.12, 0.25) * h
    lungs: list[_Ellipse] = []
    lung_w = np.zeros_like(x)
    for side in (-1.0, 1.0):
        lx = cx + side * half_w * rng.uniform(0.42, 0.52)
        e = _Ellipse(lx, 0.5 * (top + bottom), half_w * rng.uniform(0.30, 0.37),
                     0.5 * (bottom - top))
        lungs.append(e)
        # Narrow the apex: scale x distance by the height within the lung.
        frac = np.clip((y - top) / (bottom - top), 0.0, 1.0)
        squeeze = 0.65 + 0.35 * np.sqrt(frac)
        xs = e.cx + (x - e.cx) / squeeze
        lung_w = np.maximum(lung_w, _soft(_ellipse_depth(e, xs, y), 4 * edge))
    heart = _Ellipse(cx + rng.uniform(0.02, 0.08) * w, bottom - rng.uniform(0.10, 0.16) * h,
                     half_w * rng.uniform(0.28, 0.36), rng.uniform(0.12, 0.16) * h)
    heart_w = _soft(_ellipse_depth(heart, x, y), 4 * edge)
    lung_w *= 1.0 - heart_w
    atten -= rng.uniform(0.45, 0.6) * lung_w * np.sqrt(t)
    atten += 0.25 * heart_w
    atten += 0.35 * _band_weight(x - cx, rng.uniform(0.035, 0.045) * w, 4 * edge)  # spine

    # Ribs: arcs from the spine out over each lung field, evenly spaced down
    # the chest; only within the thorax. Clavicles across the apices.
    n_ribs = int(rng.integers(8, 11))
    rib_amp = rng.uniform(0.06, 0.12)
    dx = np.abs(x - cx)
    thorax = (y > top - 0.04 * h) & (y < bottom + 0.04 * h) & (dx < 0.95 * half_w)
    ribs = np.zeros_like(x)
    for k in range(n_ribs):
        y0 = top + (k + 0.3) * (bottom - top) / n_ribs
        curve = rng.uniform(0.6, 1.0) / half_w
        rib = _band_weight(y - (y0 - 0.15 * dx + curve * dx**2), rng.uniform(4.0, 6.0), 2 * edge)
        np.maximum(ribs, rib, out=ribs)
    atten += rib_amp * ribs * thorax
    clav_y = top + 0.03 * h - 0.12 * dx
    atten += 0.15 * _band_weight(y - clav_y, 6.0, 2 * edge) * (dx > 0.03 * w) * (dx < 0.8 * half_w)

    # Detector: gamma, gain, offset, a gentle heel-effect gradient, noise.
    # Drawn before the nodule, so that one seed gives the same image with and
    # without it.
    gamma = rng.uniform(0.8, 1.2)
    heel = rng.uniform(-0.1, 0.1)
    offset, gain = rng.uniform(200.0, 600.0), rng.uniform(1800.0, 3000.0)
    noise = rng.normal(0.0, rng.uniform(10.0, 40.0), x.shape)

    center = None
    if lesion:
        radius = rng.uniform(5.0, 15.0)
        lung = lungs[int(rng.integers(0, 2))]
        px, py = lung.cx, lung.cy
        for _ in range(64):
            qx = lung.cx + rng.uniform(-0.8, 0.8) * lung.ax
            qy = lung.cy + rng.uniform(-0.8, 0.8) * lung.ay
            ix = int(round(qx / sx + (cols - 1) / 2.0))
            iy = int(round(qy / sy + (rows - 1) / 2.0))
            if not (0 <= ix < cols and 0 <= iy < rows):
                continue
            if lung_w[iy, ix] > 0.99 and _ellipse_depth(heart, np.array([qx]),
                                                         np.array([qy]))[0] < -radius:
                px, py = qx, qy
                break
        d2 = ((x - px) ** 2 + (y - py) ** 2) / radius**2
        atten += rng.uniform(0.25, 0.7) * np.sqrt(np.clip(1.0 - d2, 0.0, None))
        center = (int(round(py / sy + (rows - 1) / 2.0)), int(round(px / sx + (cols - 1) / 2.0)))

    atten = np.clip(atten, 0.0, None) ** gamma * (1.0 + heel * (y / h))
    img = offset + gain * atten + noise
    return np.clip(np.round(img), 0, 4095).astype(np.uint16), center
