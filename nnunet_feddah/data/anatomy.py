"""Voxelised synthetic abdominal anatomy for the phantom cohort (:mod:`nnunet_feddah.data.phantom`).

Coordinate convention: patient LPS millimetres (the DICOM/ITK convention, so an identity direction
matrix in the written NIfTI files is the ordinary axial orientation) — x increases towards the
patient's LEFT, y towards POSTERIOR, z towards CRANIAL. Arrays are indexed ``[z, y, x]``; slice 0 is
the most caudal one. The body frame's origin is the torso centre on the axial plane and, on z, about
the level of the renal hila (L1/L2). Every anatomical number here is in millimetres of that frame and
is voxelised at the requested spacing, so sites with different scanners see anatomy of the same size.

The model is deliberately cheap (well under a second per CPU-sized case): organs are rotated
ellipsoids with low-order random radial perturbations, or tubes swept along smooth random
centre-lines; a drawing order plus "only paint free voxels inside the abdominal cavity" keeps them
from overlapping, the way a real organ takes the impression of its neighbours.

Over 400 lines as one module: one ``_Builder`` draws a patient from one random stream in a fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

#: Field of view (z, y, x) in mm: liver dome / lung bases to the prostate, the whole torso width.
FOV_MM: tuple[float, float, float] = (320.0, 340.0, 384.0)
#: Body-frame z of the FOV centre; z = 0 is about the renal hila.
FOV_CENTRE_Z = -42.0

# Tissue codes for the image model. 1..15 are the AMOS organs themselves (their default appearance).
(AIR, FAT, MUSCLE, BOWEL, GAS, LUNG, HEART, CORTICAL, CANCELLOUS, DISC, CSF, VESSEL, FLUID, MEDULLA,
 FECES) = range(16, 31)
#: Portal-venous-phase HU as (mean, amplitude of the smooth per-tissue texture).
TISSUE_HU: dict[int, tuple[float, float]] = {
    1: (120, 6), 2: (180, 6), 3: (180, 6), 4: (12, 3), 5: (45, 6), 6: (110, 7), 7: (70, 5), 8: (175, 5),
    9: (135, 6), 10: (95, 8), 11: (65, 6), 12: (65, 6), 13: (50, 6), 14: (8, 3), 15: (60, 7),
    AIR: (-1000, 0), FAT: (-100, 10), MUSCLE: (50, 6), BOWEL: (35, 12), GAS: (-900, 40), LUNG: (-850, 25),
    HEART: (130, 8), CORTICAL: (650, 60), CANCELLOUS: (250, 40), DISC: (90, 8), CSF: (15, 4), VESSEL: (165, 5),
    FLUID: (15, 4), MEDULLA: (145, 5), FECES: (-30, 70),
}

#: Tissues whose HU depends on the contrast timing (jittered per patient); fat, air, bone and fluid do not.
_ENHANCING = {*range(1, 16), MUSCLE, BOWEL, HEART, VESSEL, MEDULLA} - {4, 14}


@dataclass
class Anatomy:
    """One synthetic patient before any scanner effect: clean HU, full AMOS labels, body outline."""

    hu: np.ndarray  # float32 [z, y, x]
    labels: np.ndarray  # uint8 [z, y, x], all 15 AMOS ids
    body: np.ndarray  # bool [z, y, x], inside the skin


def fov_shape(spacing_zyx: Sequence[float], fov_mm: Sequence[float] = FOV_MM) -> tuple[int, int, int]:
    """Voxel counts covering ``fov_mm`` at ``spacing_zyx`` (coarser scanners get fewer voxels)."""
    return tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing_zyx, strict=True))  # type: ignore[return-value]


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse_shape: list[int]) -> np.ndarray:
    """Unit-variance random field: white noise on ``coarse_shape`` upsampled to ``shape`` by Gaussian weights.

    Separable matrix products instead of ``ndimage.zoom``: ten times faster, and just as smooth.
    """
    field = rng.standard_normal(coarse_shape).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, coarse_shape, strict=True)):
        t = np.linspace(0.0, c - 1.0, n)[:, None] - np.arange(c)[None, :]
        w = np.exp(-0.5 * (t / 0.7) ** 2).astype(np.float32)
        field = np.moveaxis(np.tensordot(w / w.sum(1, keepdims=True), field, axes=(1, axis)), 0, axis)
    return (field - field.mean()) / (field.std() + 1e-6)


def _rotation(rz: float, ry: float, rx: float) -> np.ndarray:
    """Rotation acting on (z, y, x) vectors: ``rz`` degrees in the axial plane, ``ry`` coronal, ``rx`` sagittal."""

    def plane(i: int, j: int, deg: float) -> np.ndarray:
        m, a = np.eye(3), np.deg2rad(deg)
        m[i, i] = m[j, j] = np.cos(a)
        m[i, j], m[j, i] = -np.sin(a), np.sin(a)
        return m

    return plane(1, 2, rz) @ plane(0, 2, ry) @ plane(0, 1, rx)


class _Builder:
    """Draws one patient; methods run in a fixed order so the random stream is deterministic."""

    def __init__(self, rng: np.random.Generator, spacing: tuple[float, float, float], shape: tuple[int, int, int]):
        self.rng = rng
        self.shape = shape
        self.spacing = np.asarray(spacing, float)
        r = rng.uniform
        # table position: the patient is not perfectly centred in the field of view
        centre = (FOV_CENTRE_Z + r(-6, 6), r(-8, 8), r(-6, 6))
        self.axes = [c + (np.arange(n) - (n - 1) / 2) * s for c, n, s in zip(centre, shape, self.spacing, strict=True)]
        self.A, self.B = r(112, 134), r(84, 104)  # abdominal-cavity half-axes (LR, AP)
        self.fat, self.wall = r(6, 28), r(9, 14)  # subcutaneous fat and muscle-wall thickness
        self.sz, self.dz = r(0.95, 1.03), r(-6, 6)  # craniocaudal stretch and shift of the organ layout
        self.female = bool(rng.random() < 0.5)
        self.dome_right = r(97, 106) * self.sz + self.dz
        self.dome_left = self.dome_right - r(4, 14)
        self.texture, self.bowel_field, self.shape_field = (self._field(c) for c in (9.0, 11.0, 24.0))
        self.labels = np.zeros(shape, np.uint8)
        self.tissue = np.full(shape, AIR, np.uint8)

    # ---- geometry helpers -------------------------------------------------------------------
    def _field(self, cell_mm: float) -> np.ndarray:
        """Smooth unit-variance random field with features of about ``cell_mm`` (on a lattice in mm)."""
        coarse = [max(2, int(np.ceil(n * s / cell_mm)) + 1) for n, s in zip(self.shape, self.spacing, strict=True)]
        return smooth_field(self.rng, self.shape, coarse)

    def delta(self, x: float, y: float, z: float, jitter: float = 0.0) -> np.ndarray:
        """Nominal offset (for a 250 x 190 mm cavity) -> this patient's (z, y, x) offset, jittered."""
        return np.array([z * self.sz, y * self.B / 95.0, x * self.A / 125.0]) + self.rng.normal(0.0, jitter, 3)

    def at(self, x: float, y: float, z: float, jitter: float = 3.0) -> np.ndarray:
        """Nominal body-frame position -> this patient's (z, y, x) position, jittered."""
        return self.delta(x, y, z, jitter) + [self.dz, 0.0, 0.0]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie in the box [lo, hi] (mm), clipped to the grid."""
        bounds = zip(self.axes, lo, hi, strict=True)
        idx = [(int(np.searchsorted(a, l0)), int(np.searchsorted(a, h0, "right"))) for a, l0, h0 in bounds]
        return tuple(slice(*i) for i in idx)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = (a[s] for a, s in zip(self.axes, sl, strict=True))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def blob(self, centre: np.ndarray, radii: tuple[float, float, float], rot: tuple[float, float, float] = (0, 0, 0),
             wobble: float = 0.1, bumps: float = 0.05) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
        """Rotated ellipsoid (radii z, y, x in mm) with a random low-order radial perturbation.

        Returns the bounding-box slices, the mask inside them and the normalised radius (0 at the centre,
        1 at the surface) that organs use for inner structure such as the renal medulla.
        """
        radii_a = np.asarray(radii, float)
        reach = radii_a.max() * (1 + 2 * wobble + 3 * bumps)
        sl = self.box(centre - reach, centre + reach)
        z, y, x = self.coords(sl)
        d = (z - centre[0], y - centre[1], x - centre[2])
        rot_m = _rotation(*rot)
        q = [sum(rot_m[j, i] * d[j] for j in range(3)) / radii_a[i] for i in range(3)]
        rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-6
        limit = 1.0 + bumps * self.shape_field[sl]
        for _ in range(4):  # spherical-harmonic-like low-order lobes
            w = self.rng.normal(size=3)
            w *= self.rng.uniform(1.5, 3.5) / np.linalg.norm(w)
            lobe = np.cos((w[0] * q[0] + w[1] * q[1] + w[2] * q[2]) / rho + self.rng.uniform(0, 2 * np.pi))
            limit = limit + wobble * self.rng.uniform(0.4, 1.0) * lobe
        return sl, rho < limit, rho / limit

    def tube(self, points: np.ndarray, radii: np.ndarray | float, flatten: float = 1.0
             ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
        """Tube of varying radius along a cubic spline through ``points`` (N x (z, y, x) mm).

        ``flatten`` > 1 squashes the cross-section antero-posteriorly (IVC, collapsed oesophagus).
        Returns slices, mask and the distance to the centre-line divided by the local radius.
        """
        seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
        t = np.concatenate([[0.0], np.cumsum(seg)])
        samples_t = np.linspace(0.0, t[-1], max(8, int(t[-1] / 1.0)))
        curve = CubicSpline(t, points, bc_type="natural")(samples_t)
        r = np.interp(samples_t, t, np.broadcast_to(radii, t.shape))
        sl = self.box(curve.min(0) - r.max() - 1, curve.max(0) + r.max() + 1)
        z, y, x = (np.broadcast_to(a, [s.stop - s.start for s in sl]) for a in self.coords(sl))
        scale = np.array([1.0, flatten, 1.0])
        pts = np.stack([z.ravel(), y.ravel(), x.ravel()], 1) * scale
        dist, idx = cKDTree(curve * scale).query(pts, distance_upper_bound=r.max() * flatten + 1)
        rel = np.where(np.isfinite(dist), dist / r[np.minimum(idx, len(r) - 1)], np.inf).reshape(z.shape)
        return sl, rel < 1.0, rel

    def paint(self, label: int, sl: tuple[slice, ...], mask: np.ndarray, clip: np.ndarray | None = None) -> np.ndarray:
        """Give ``label`` to the voxels of ``mask`` that are still free cavity; returns what was painted."""
        free = mask & (self.labels[sl] == 0) & self.allowed[sl]
        if clip is not None:
            free &= clip
        self.labels[sl][free] = label
        self.tissue[sl][free] = label
        return free

    def spine_y(self, z: np.ndarray | float) -> np.ndarray:
        """AP position of the vertebral-body centre at body-frame ``z``: lumbar lordosis forward, sacrum back."""
        return np.interp((z - self.dz) / self.sz, [-210, -150, -95, 0, 130], [70, 45, 14, 24, 34]) * self.B / 95.0

    def diaphragm(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Height of the diaphragm: two domes (right higher), dropping into the posterior recesses."""
        right = self.dome_right - 0.008 * (x + 0.45 * self.A) ** 2
        left = self.dome_left - 0.008 * (x - 0.45 * self.A) ** 2
        return np.maximum(right, left) - 0.002 * y**2 - 0.45 * np.maximum(y, 0)

    def spine_ry(self, z: np.ndarray | float) -> np.ndarray:
        """AP half-depth of the vertebral body (the sacrum is flat)."""
        return np.interp((z - self.dz) / self.sz, [-210, -150, -110, 0, 130], [11, 15, 17, 17, 15])

    # ---- anatomy, drawn in this order -------------------------------------------------------
    def body(self) -> None:
        """Skin, subcutaneous fat, abdominal wall and the cavity the organs live in (polar model per slice)."""
        z, y, x = self.coords((slice(None),) * 3)
        knots = np.array([-210.0, -140, -60, 20, 130])

        def along_z(values: np.ndarray) -> np.ndarray:
            return np.interp((z[:, 0, 0] - self.dz) / self.sz, knots, values)[:, None, None]

        n = self.rng.normal
        half_x = self.A * along_z(np.array([1.06, 1.05, 1.0, 1.0, 1.02]) + n(0, 0.025, 5))
        half_y = self.B * along_z(np.array([0.95, 0.96, 1.0, 1.02, 1.06]) + n(0, 0.025, 5))
        self.theta, self.rr = np.arctan2(y, x), np.hypot(y, x)
        sin, cos = np.sin(self.theta), np.cos(self.theta)
        p = np.where(sin > 0, 2.6, 2.1)  # flatter back, rounder belly
        rc = 1.0 / ((np.abs(cos) / half_x) ** p + (np.abs(sin) / half_y) ** p) ** (1.0 / p)
        for k in range(2, 6):
            rc = rc * (1 + along_z(n(0, 0.05 / k, 5)) * np.cos(k * self.theta + self.rng.uniform(0, 2 * np.pi)))
        fat = self.fat * (1 + 0.5 * np.clip(-sin, 0, 1) + 0.4 * np.abs(cos)) * (1 + along_z(n(0, 0.12, 5)))
        self.rc = rc
        self.body_mask = self.rr < rc + self.wall + fat
        self.tissue[self.body_mask] = FAT
        self.tissue[self.rr < rc + self.wall] = MUSCLE
        self.tissue[self.rr < rc] = BOWEL  # placeholder for "free cavity" until filler()

    def skeleton(self) -> None:
        """Spine, back and psoas muscles, ribs and pelvis: in the image only, and off limits to organs."""
        z, y, x = self.coords((slice(None),) * 3)
        zn, t = (z - self.dz) / self.sz, self.tissue  # nominal z: the skeleton stretches with the organ layout
        ys, ry = self.spine_y(z), self.spine_ry(z)
        rx = np.interp(zn, [-210, -150, -110, 0, 130], [36, 46, 26, 24, 18])
        vertebra = ((zn - self.rng.uniform(0, 32)) / 32.0 % 1.0 > 0.25) | (zn < -125)
        canal_y = ys + ry + 8
        dc = np.hypot(x, y - canal_y)
        lumbar = (zn > -150) & vertebra
        inside = self.rr < self.rc + self.wall
        # muscles first, bone on top
        muscle = inside & (y > canal_y - 10 + 0.005 * x**2)  # erector spinae and quadratus lumborum
        psoas_r = np.interp(zn, [-175, -120, -40, 15], [16, 22, 20, 0])
        psoas_x = np.interp(zn, [-175, -120, -40, 15], [60, 48, 36, 28])
        muscle |= np.hypot(np.abs(x) - psoas_x, y - ys + 4) < psoas_r
        t[muscle] = MUSCLE
        e = (x / rx) ** 2 + ((y - ys) / ry) ** 2
        t[e < 1] = np.where(vertebra, np.where(e > 0.65, CORTICAL, CANCELLOUS), DISC)[e < 1]
        arch = lumbar & (((dc < 14) & (y > canal_y - 4)) | ((np.abs(x) < 5) & (y > canal_y) & (y < canal_y + 36)))
        arch |= lumbar & (np.abs(y - canal_y + 3) < 3) & (np.abs(x) < 34) & (zn > -110)  # transverse processes
        t[arch & self.body_mask] = CORTICAL
        t[(dc < 8) & (zn > -150)] = CSF
        # ribs: oblique hoops in the wall, descending anteriorly, above the costal margin
        sin = np.sin(self.theta)
        phase = (zn - 30 * sin) / 28.0 + self.rng.uniform(0, 1)
        ribs = (phase % 1.0 < 0.32) & (zn > 40 - 45 * sin) & (sin > -0.85)
        t[ribs & (self.rr > self.rc - 2) & (self.rr < self.rc + self.wall - 1)] = CORTICAL
        # pelvis: iliac wings as curved plates from the sacro-iliac joint forwards, muscle on both faces
        knots = [-175, -150, -120, -95, -80]
        ends = [np.interp(zn, knots, v) for v in ([55, 48, 42, 48, 60], [35, 45, 50, 48, 45],
                                                  [88, 100, 112, 105, 80], [-10, -15, -30, 10, 35])]
        pelvis = np.flatnonzero((zn[:, 0, 0] > -175) & (zn[:, 0, 0] < -78))
        wing = np.full(self.shape, np.inf, np.float32)
        if pelvis.size:
            ax, ay = np.abs(x), np.broadcast_to(y, (pelvis.size, *self.shape[1:]))
            u = np.linspace(0.0, 1.0, 9)[:, None, None, None]  # polyline along a curve bulging outwards
            bulge = 4 * u * (1 - u) * 14
            e = [v[pelvis][None] for v in ends]
            wx = ((1 - u) * e[0] + u * e[2] + bulge) * self.A / 125
            wy = ((1 - u) * e[1] + u * e[3] + bulge * 0.6) * self.B / 95
            for i in range(8):
                dx, dy = wx[i + 1] - wx[i], wy[i + 1] - wy[i]
                s = np.clip(((ax - wx[i]) * dx + (ay - wy[i]) * dy) / (dx**2 + dy**2), 0, 1)
                wing[pelvis] = np.minimum(wing[pelvis], np.hypot(ax - wx[i] - s * dx, ay - wy[i] - s * dy))
        t[inside & (wing < 22)] = MUSCLE
        t[wing < 4.5] = CORTICAL
        for side in (-1, 1):
            c = self.at(side * 0.74 * 125, -5, -188, jitter=2)
            d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
            t[(d < 34) & inside] = MUSCLE
            t[d < 24] = CORTICAL
            t[d < 20] = CANCELLOUS
        self.allowed = t == BOWEL

    def below_diaphragm(self, sl: tuple[slice, ...]) -> np.ndarray:
        z, y, x = self.coords(sl)
        return z < self.diaphragm(y, x)

    def organs(self) -> None:
        """All 15 AMOS organs. Earlier organs win overlaps, so thin vessels go first and the liver last."""
        r, n, t = self.rng.uniform, self.rng.normal, self.tissue

        def grow(sd: float) -> float:  # random volume factor, as a linear factor
            return float(np.exp(np.clip(n(0.0, sd), -2 * sd, 2 * sd)) ** (1 / 3))

        def spine_front(z_mm: np.ndarray) -> np.ndarray:  # y just in front of the vertebral body
            return self.spine_y(z_mm) - self.spine_ry(z_mm)

        def path(xs: list[float], ys: list[float], zs: list[float], jitter: float = 3.0) -> np.ndarray:
            return np.array([self.at(a, b, c, jitter) for a, b, c in zip(xs, ys, zs, strict=True)])

        # great vessels: aorta left-anterior, IVC right-anterior of the spine
        aorta = path([20, 9, 7, 5, 3, 1], [0] * 6, [125, 90, 40, 0, -50, -97], jitter=1.5)
        ra = 11.5 * r(0.85, 1.2) * np.array([1.05, 1.0, 0.95, 0.9, 0.85, 0.8])
        aorta[:, 1] = spine_front(aorta[:, 0]) - ra - 3 + np.array([16, 0, 0, 0, 0, 0])
        self.paint(8, *self.tube(aorta, ra)[:2])
        ivc = path([-20, -23, -25, -30, -26, -15], [0, 0, 0, -12, -18, -22], [-100, -50, 0, 50, 95, 125])
        rv = 12.0 * r(0.85, 1.15)
        ivc[:3, 1] = spine_front(ivc[:3, 0]) - rv * 0.7 - 2
        self.paint(9, *self.tube(ivc, rv, flatten=1.4)[:2])
        top = aorta[:2] - [[0, 22, 4], [0, 20, -5]]
        esophagus = np.vstack([top, path([28, 42], [-15, -10], [88, 80])])
        self.paint(5, *self.tube(esophagus, 8.5 * r(0.9, 1.15), flatten=1.4)[:2])

        # retroperitoneum: adrenals sit on the upper poles of the kidneys (right kidney lower)
        kidneys = {2: self.at(-68, 32, -15), 3: self.at(68, 30, 0)}
        kidney_r = {k: np.array([57, 25, 28]) * grow(0.15) for k in kidneys}
        for label, side, dy, dz in ((11, -1, -8, 6), (12, 1, -10, -6)):
            centre = kidneys[label - 9] + self.delta(-side * 31, dy, 0, 2) + [kidney_r[label - 9][0] + dz, 0, 0]
            sl, mask, _ = self.blob(centre, tuple(np.array([17, 12, 7]) * grow(0.15)), (side * 30, 0, 0), 0.08)
            self.paint(label, sl, mask, self.below_diaphragm(sl))
        for label, side in ((2, -1), (3, 1)):
            c = kidneys[label]
            rot = (side * r(15, 35), side * r(5, 18), r(-5, 12))
            sl, mask, rho = self.blob(c, tuple(kidney_r[label]), rot, 0.06)
            z, y, x = self.coords(sl)
            hilum = c + _rotation(*rot) @ (kidney_r[label] * [0, -0.35, -side * 0.95])  # faces antero-medially
            notch = (z - hilum[0]) ** 2 / 2.5 + (y - hilum[1]) ** 2 + (x - hilum[2]) ** 2  # the renal sinus
            mask &= notch > (0.5 * kidney_r[label][2]) ** 2
            painted = self.paint(label, sl, mask, self.below_diaphragm(sl))
            t[sl][painted & (rho < 0.62)] = MEDULLA

        # pancreas head in the duodenal C-loop, body in front of the aorta, tail at the splenic hilum
        pancreas = path([-40, -30, -8, 25, 55, 78], [-12, -22, -36, -28, 0, 25], [-18, -2, 8, 18, 28, 35])
        self.paint(10, *self.tube(pancreas, np.array([17, 15, 12, 11, 10, 9]) * grow(0.2))[:2])
        duodenum = path([-22, -42, -58, -60, -52, -25, 5, 25, 30], [-40, -25, -8, -5, -14, -32, -38, -28, -24],
                        [20, 22, 12, -15, -40, -54, -56, -45, -20])
        sl, mask, rel = self.tube(duodenum, np.array([11, 12, 13, 13, 13, 12, 11, 11, 11]) * grow(0.15))
        painted = self.paint(13, sl, mask)
        t[sl][painted & (rel < 0.55)] = GAS if r() < 0.3 else FLUID

        # gallbladder: under the liver, fundus forwards and down
        gb_r = tuple(np.array([32, 15, 15]) * grow(0.35))
        self.paint(4, *self.blob(self.at(-42, -42, 2, 5), gb_r, (0, 0, r(25, 45)), 0.08)[:2])

        # spleen: along the left posterolateral ribs, its hilum (concave) facing the stomach
        spleen_c, spleen_r = self.at(90, 26, 44, 5), np.array([52, 56, 28]) * grow(0.25)
        rot = (r(20, 40), 0, r(-15, 15))
        sl, mask, _ = self.blob(spleen_c, tuple(spleen_r), rot, 0.12)
        z, y, x = self.coords(sl)
        hilum = spleen_c + _rotation(*rot) @ (spleen_r * [0, -0.3, -1] - [0, 0, 8])
        mask &= (z - hilum[0]) ** 2 + (y - hilum[1]) ** 2 + (x - hilum[2]) ** 2 > 20.0**2
        self.paint(1, sl, mask, self.below_diaphragm(sl))

        # stomach: J-shaped tube from the fundus under the left dome to the pylorus; air floats anteriorly
        stomach = path([65, 70, 45, 5, -22], [10, -15, -50, -55, -40], [95, 55, 15, 15, 22], jitter=5)
        sl, mask, rel = self.tube(stomach, np.array([36, 32, 26, 18, 11]) * grow(0.3), flatten=1.1)
        painted = self.paint(7, sl, mask, self.below_diaphragm(sl))
        lumen = painted & (rel < 0.8)
        if lumen.any():
            y = np.broadcast_to(self.coords(sl)[1], lumen.shape)[lumen]
            level = np.quantile(y, r(0.05, 0.45))
            t[sl][lumen] = np.where(y < level, GAS, FLUID)

        # liver: big right lobe plus a thin left lobe, wedge-cut inferiorly, domed by the diaphragm
        g = grow(0.15)
        right = self.blob(self.at(-60, 0, 52, 5), tuple(np.array([86, 98, 88]) * g), (r(-10, 10), 0, 0), 0.08)
        left = self.blob(self.at(12, -52, 68, 5), tuple(np.array([42, 32, 62]) * g), (r(-25, -5), 0, 0), 0.1)
        slope, floor = r(0.25, 0.45), self.at(0, 0, -38, 6)[0]
        for sl, mask, _ in (right, left):
            z, y, x = self.coords(sl)
            self.paint(6, sl, mask, self.below_diaphragm(sl) & (z > floor + slope * (x + 1.1 * self.A)))

        # pelvis: bladder low and anterior; prostate below it or uterus above and behind it
        bladder_c = self.at(0, -45, -140, 4)
        bladder_r = np.array([26, 30, 40]) * grow(0.45)
        self.paint(14, *self.blob(bladder_c, tuple(bladder_r), (0, 0, 0), 0.05)[:2])
        if self.female:
            c = bladder_c + self.delta(0, 40, 0.6 * bladder_r[0], 3)
            sl, mask, _ = self.blob(c, tuple(np.array([40, 22, 30]) * grow(0.25)), (0, 0, r(-60, -35)), 0.08)
        else:
            c = bladder_c + np.array([-bladder_r[0] - 8, 18, 0]) + n(0, 2, 3)
            sl, mask, _ = self.blob(c, tuple(np.array([16, 16, 20]) * grow(0.25)), (0, 0, 0), 0.06)
        self.paint(15, sl, mask)

    def vessels_and_colon(self) -> None:
        """Unlabelled structures that make the background look like an abdomen, not like empty fat."""
        r, t = self.rng.uniform, self.tissue

        def path(points: list[tuple[float, float, float]], jitter: float = 3.0) -> np.ndarray:
            return np.array([self.at(*p, jitter=jitter) for p in points])

        def draw(code: int, sl: tuple[slice, ...], mask: np.ndarray, where: tuple[int, ...] = (0,)) -> np.ndarray:
            m = mask & np.isin(self.labels[sl], where) & (self.allowed[sl] | (self.labels[sl] > 0))
            t[sl][m] = code
            self.allowed[sl] &= ~m
            return m

        for side in (-1, 1):  # iliac arteries and veins from the bifurcation to the pelvic wall
            draw(VESSEL, *self.tube(path([(2, -14, -97), (side * 30, -5, -125), (side * 62, 0, -165)]), 6.5)[:2])
            draw(VESSEL, *self.tube(path([(-18, -2, -104), (side * 34, 8, -130), (side * 64, 10, -170)]), 7.5)[:2])
        portal = path([(-8, -30, -40), (-12, -28, 4), (-38, -12, 42), (-78, 0, 58)])
        draw(VESSEL, *self.tube(portal, 7.0)[:2], where=(0, 6))
        for end in ((-95, -5, 75), (-40, -60, 85), (8, -55, 88)):  # hepatic veins (inside the liver only)
            draw(VESSEL, *self.tube(path([(-26, -18, 96), end]), 4.5)[:2], where=(6,))
        colon = path([(-85, -10, -95), (-95, 5, -40), (-85, -25, 10), (-30, -72, 0), (40, -70, 5), (95, -15, 35),
                      (100, 15, -40), (55, -35, -115), (10, 40, -135), (0, 60, -195)], jitter=6)
        sl, mask, rel = self.tube(colon, 21.0 * r(0.8, 1.2))
        wall = draw(BOWEL, sl, mask)
        t[sl][wall & (rel < 0.75)] = np.where(self.shape_field[sl] > r(-0.5, 0.8), GAS, FECES)[wall & (rel < 0.75)]

    def filler(self) -> None:
        """Whatever is left of the cavity: lung bases and heart above the diaphragm, bowel and fat below."""
        z, y, x = self.coords((slice(None),) * 3)
        free = self.allowed & (self.labels == 0)
        above = z > self.diaphragm(y, x)
        heart_c = self.at(18, -40, 0, 4)
        heart = ((x - heart_c[2]) / 60) ** 2 + ((y - heart_c[1]) / 48) ** 2 + ((z - self.dome_left - 38) / 45) ** 2 < 1
        t = self.tissue
        t[free & above] = LUNG
        t[free & above & heart] = HEART
        below = free & ~above
        loops = self.bowel_field > 0.1 + 0.04 * np.maximum(y - 0.1 * self.B, 0)  # retroperitoneum: fat
        t[below] = FAT
        t[below & loops] = BOWEL
        t[below & (self.bowel_field > 0.9 + 0.04 * np.maximum(y - 0.1 * self.B, 0))] = FLUID
        t[below & loops & (self.shape_field > 1.8)] = GAS

    def render(self) -> np.ndarray:
        """Tissue codes -> HU: per-patient contrast timing jitters organ means; smooth per-tissue texture."""
        table = np.zeros((2, max(TISSUE_HU) + 1), np.float32)
        for code, (mean, amp) in TISSUE_HU.items():
            table[:, code] = (mean + (self.rng.normal(0, 6) if code in _ENHANCING else 0.0), amp)
        table[0, 15] += 20 if self.female else -10  # myometrium enhances more than the prostate
        return table[0][self.tissue] + table[1][self.tissue] * self.texture


def synthesize(rng: np.random.Generator, spacing_zyx: tuple[float, float, float],
               shape_zyx: tuple[int, int, int] | None = None) -> Anatomy:
    """Draw one patient at ``spacing_zyx`` (mm); ``shape_zyx`` defaults to :data:`FOV_MM` at that spacing."""
    b = _Builder(rng, spacing_zyx, shape_zyx or fov_shape(spacing_zyx))
    b.body()
    b.skeleton()
    b.organs()
    b.vessels_and_colon()
    b.filler()
    return Anatomy(b.render().astype(np.float32), b.labels, b.body_mask)
