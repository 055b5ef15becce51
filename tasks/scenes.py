"""``scenes``: the embedded vision default. Procedurally rendered 3-D rooms with exact dense labels, no download.

Each image is a room (floor ``y = 0`` and four walls 2.6 high, no ceiling, so rays above the walls see "sky")
holding 1..``objects`` primitives (spheres, yawed boxes, vertical cylinders) standing on the floor, each of a
random object class. A pinhole camera (horizontal field of view ``fov`` degrees) stands near the front wall at a
random height, yaw and downward pitch. Rendering is ray casting by vectorised tensor code: every ray is
intersected analytically with every primitive of its scene at once (``[images, rays, objects]`` tensors; slab
method for boxes, quadratic for spheres and cylinder sides, plane for caps, floor and walls) and the nearest hit
wins. Colour = albedo x (ambient + Lambert term of a random directional light), where the albedo is the class's
base colour (a fixed palette, so a class looks alike across seeds), jittered per object, times the class's
procedural texture (sinusoidal stripes of a class-specific frequency and direction in world coordinates; floor:
checkerboard, walls: plain), plus Gaussian pixel noise; sky is a vertical gradient. No shadows, no
anti-aliasing: every label is exact at the pixel centre.

Tasks (all from the same geometry, hence related the way NYUv2's are):

- ``seg``: ``classes + 2`` semantic classes: 0 floor, 1 wall, ``2 + k`` object class k; sky is ignored (255);
- ``depth``: z-depth in the camera frame (metres; the room is 8 x 8), invalid on sky;
- ``normal``: unit surface normals in the camera frame (x right, y up, z backwards, facing the camera), invalid
  on sky;
- ``boundary``: semantic boundaries: pixels with a 4-neighbour of another class (sky counts as a class); loss
  with HED class balancing;
- ``foreground``: object pixels (vs floor and wall), invalid on sky; plain BCE.

``--tasks nyu`` keeps NYUv2's three (seg, depth, normal). Options: ``resolution`` (square images, default 64),
``train``/``val``/``test`` image counts, ``classes``, ``objects`` (max per scene), ``fov``, ``noise``,
``data_seed`` (default: the run seed). Generation is seeded (one ``torch.Generator``, elementwise operations only,
so the same seed gives the same bytes on any thread count) and cached under ``$MTLBENCH_CACHE_DIR/tensors``.
Splits are independent draws from the same generator (train, then val, then test).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from mtlbench import (DatasetAdapter, FeatureSchema, MtlbenchError, MultiTaskData, Split, TaskSpec, option_field,
                      register_dataset)
from mtlbench.data import ImageSpec
from mtlbench.tasks.helpers import cached_tensors

ROOM = 4.0        # half-size of the room in x and z
WALL_HEIGHT = 2.6
SKY = 255         # ignore value of the class map
EPS = 1e-6
FAR = 1e6


def _palette(classes: int) -> torch.Tensor:
    """Base colours of floor, wall and the object classes: fixed (seed-independent) and distinct; beyond the
    eight listed, colours come from a fixed generator."""
    fixed = [[0.55, 0.5, 0.45], [0.8, 0.8, 0.78], [0.85, 0.2, 0.2], [0.2, 0.7, 0.25], [0.2, 0.35, 0.85],
             [0.9, 0.8, 0.2], [0.75, 0.3, 0.8], [0.2, 0.75, 0.8], [0.95, 0.55, 0.15], [0.5, 0.3, 0.15]]
    extra = max(0, classes - len(fixed))
    more = torch.rand(extra, 3, generator=torch.Generator().manual_seed(20261204))
    return torch.cat([torch.tensor(fixed[:classes]), more]).float()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def render(n: int, resolution: int, classes: int, objects: int, fov: float, noise: float,
           g: torch.Generator, chunk: int = 64) -> dict[str, torch.Tensor]:
    """``n`` scenes drawn from ``g``: images uint8 ``[n, 3, R, R]`` and every label map."""
    parts = [_render_chunk(min(chunk, n - i), resolution, classes, objects, fov, noise, g)
             for i in range(0, n, chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _render_chunk(n: int, R: int, classes: int, M: int, fov: float, noise: float,
                  g: torch.Generator) -> dict[str, torch.Tensor]:
    f64 = torch.float32  # geometry in float32: exact enough at 64x64, twice as fast
    u = lambda *s: torch.rand(*s, generator=g, dtype=f64)  # noqa: E731
    # -- scene parameters (all drawn first, in a fixed order) --
    cam = torch.stack([(u(n) - 0.5) * 2.0, 1.2 + 0.8 * u(n), -ROOM + 0.6 + 1.0 * u(n)], -1)
    yaw = (u(n) - 0.5) * 0.7
    pitch = -0.1 - 0.4 * u(n)
    light = torch.stack([(u(n) - 0.5) * 1.2, 1.0 + 0.0 * u(n), (u(n) - 0.5) * 1.2], -1)
    light = light / _dot(light, light).sqrt()[:, None]
    count = 1 + (u(n) * M).long().clamp(max=M - 1)
    active = torch.arange(M)[None] < count[:, None]                       # [n, M]
    shape = (u(n, M) * 3).long().clamp(max=2)                             # 0 sphere, 1 box, 2 cylinder
    cls = (u(n, M) * classes).long().clamp(max=classes - 1)
    size = 0.35 + 0.5 * u(n, M)
    height = size * (0.8 + 1.6 * u(n, M))
    ox = (u(n, M) - 0.5) * 2 * (ROOM - 1.0)
    oz = -0.5 + u(n, M) * (ROOM - 1.5)
    rot = u(n, M) * math.pi
    jitter = (u(n, M, 3) - 0.5) * 0.16
    pix_noise = torch.randn(n, R, R, 3, generator=g, dtype=f64) * noise
    # -- rays: camera frame x right, y up, z backwards; forward = -z --
    half = math.tan(math.radians(fov) / 2)
    coords = (torch.arange(R, dtype=f64) + 0.5) / R * 2 - 1
    px = coords[None, :].expand(R, R) * half
    py = -coords[:, None].expand(R, R) * half
    d_cam = torch.stack([px, py, -torch.ones_like(px)], -1).reshape(1, R * R, 3)
    d_cam = d_cam / _dot(d_cam, d_cam).sqrt()[..., None]
    cy, sy = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    cp, sp = torch.cos(pitch)[:, None], torch.sin(pitch)[:, None]
    x0, y0, z0 = d_cam[..., 0], d_cam[..., 1], d_cam[..., 2]
    y1 = y0 * cp - z0 * sp           # pitch about x
    z1 = y0 * sp + z0 * cp
    # the camera looks along world +z: turn 180 degrees about y (x -> -x, z -> -z), then yaw about y
    dx = -x0 * cy - z1 * sy
    dz = x0 * sy - z1 * cy
    d = torch.stack([dx.expand(n, -1), y1.expand(n, -1), dz], -1)        # world directions [n, P, 3]
    o = cam[:, None, :]                                                   # [n, 1, 3]
    P = R * R
    # -- room: floor and four walls --
    best_t = torch.full((n, P), FAR, dtype=f64)
    best_n = torch.zeros(n, P, 3, dtype=f64)
    best_c = torch.full((n, P), SKY, dtype=torch.long)
    best_o = torch.full((n, P), -1, dtype=torch.long)

    def take(t: torch.Tensor, normal: torch.Tensor, c: torch.Tensor, obj: torch.Tensor) -> None:
        nonlocal best_t, best_n, best_c, best_o
        closer = (t > EPS) & (t < best_t)
        best_t = torch.where(closer, t, best_t)
        best_n = torch.where(closer[..., None], normal, best_n)
        best_c = torch.where(closer, c, best_c)
        best_o = torch.where(closer, obj, best_o)

    planes = [(1, 0.0, (0.0, 1.0, 0.0), 0), (0, -ROOM, (1.0, 0.0, 0.0), 1), (0, ROOM, (-1.0, 0.0, 0.0), 1),
              (2, ROOM, (0.0, 0.0, -1.0), 1), (2, -ROOM, (0.0, 0.0, 1.0), 1)]
    for axis, pos, normal, c in planes:
        da = d[..., axis]
        t = torch.where(da.abs() > EPS, (pos - o[..., axis]) / torch.where(da.abs() > EPS, da, torch.ones_like(da)),
                        torch.full_like(da, -1.0))
        if c == 1:  # walls end at WALL_HEIGHT: above them is sky
            t = torch.where(o[..., 1] + t * d[..., 1] <= WALL_HEIGHT, t, torch.full_like(t, -1.0))
        nrm = torch.tensor(normal, dtype=f64).expand(n, P, 3)
        take(t, nrm, torch.full((n, P), c, dtype=torch.long), torch.full((n, P), -1, dtype=torch.long))
    # -- objects: local frame = translate to (ox, 0, oz), rotate by -rot about y --
    for j in range(M):
        cr, sr = torch.cos(rot[:, j])[:, None], torch.sin(rot[:, j])[:, None]
        rel_x, rel_y, rel_z = o[..., 0] - ox[:, j, None], o[..., 1], o[..., 2] - oz[:, j, None]
        lx, lz = rel_x * cr - rel_z * sr, rel_x * sr + rel_z * cr
        ldx, ldz = d[..., 0] * cr - d[..., 2] * sr, d[..., 0] * sr + d[..., 2] * cr
        ldy = d[..., 1]
        ly = rel_y.expand_as(ldy)
        lx, lz = lx.expand_as(ldx), lz.expand_as(ldz)
        r, h = size[:, j, None], height[:, j, None]
        # sphere (centre at height r)
        sy_ = ly - r
        b = lx * ldx + sy_ * ldy + lz * ldz
        cc = lx * lx + sy_ * sy_ + lz * lz - r * r
        disc = b * b - cc
        t_s = torch.where(disc >= 0, -b - disc.clamp(min=0).sqrt(), torch.full_like(b, -1.0))
        n_s = torch.stack([lx + t_s * ldx, sy_ + t_s * ldy, lz + t_s * ldz], -1) / r[..., None]
        # box: half extents (r, h/2, r), centre at height h/2
        lo = torch.stack([-r, torch.zeros_like(r), -r], -1)
        hi = torch.stack([r, h, r], -1)
        oo = torch.stack([lx, ly, lz], -1)
        dd = torch.stack([ldx, ldy, ldz], -1)
        safe = torch.where(dd.abs() > EPS, dd, torch.full_like(dd, EPS))
        t1, t2 = (lo - oo) / safe, (hi - oo) / safe
        tn, tf = torch.minimum(t1, t2), torch.maximum(t1, t2)
        tmin = torch.maximum(torch.maximum(tn[..., 0], tn[..., 1]), tn[..., 2])
        tmax = torch.minimum(torch.minimum(tf[..., 0], tf[..., 1]), tf[..., 2])
        t_b = torch.where((tmax >= tmin) & (tmax > 0), tmin, torch.full_like(tmin, -1.0))
        face = torch.stack([tn[..., 0] >= tmin, (tn[..., 1] >= tmin) & (tn[..., 0] < tmin),
                            (tn[..., 2] >= tmin) & (tn[..., 0] < tmin) & (tn[..., 1] < tmin)], -1).to(f64)
        n_b = -face * torch.sign(dd)
        # cylinder: radius r, y in [0, h]; side then cap
        a = ldx * ldx + ldz * ldz
        bc = lx * ldx + lz * ldz
        cc = lx * lx + lz * lz - r * r
        disc = bc * bc - a * cc
        t_side = torch.where((disc >= 0) & (a > EPS), (-bc - disc.clamp(min=0).sqrt()) / a.clamp(min=EPS),
                             torch.full_like(a, -1.0))
        y_side = ly + t_side * ldy
        t_side = torch.where((y_side >= 0) & (y_side <= h), t_side, torch.full_like(a, -1.0))
        t_cap = torch.where(ldy.abs() > EPS, (h - ly) / torch.where(ldy.abs() > EPS, ldy, torch.ones_like(ldy)),
                            torch.full_like(ldy, -1.0))
        cx_, cz_ = lx + t_cap * ldx, lz + t_cap * ldz
        t_cap = torch.where((cx_ * cx_ + cz_ * cz_ <= r * r) & (t_cap > EPS), t_cap, torch.full_like(a, -1.0))
        use_side = (t_side > EPS) & ((t_cap <= EPS) | (t_side < t_cap))
        t_c = torch.where(use_side, t_side, t_cap)
        n_side = torch.stack([lx + t_side * ldx, torch.zeros_like(a), lz + t_side * ldz], -1) / r[..., None]
        n_cap = torch.stack([torch.zeros_like(a), torch.ones_like(a), torch.zeros_like(a)], -1)
        n_c = torch.where(use_side[..., None], n_side, n_cap)
        sh = shape[:, j, None]
        t = torch.where(sh == 0, t_s, torch.where(sh == 1, t_b, t_c))
        t = torch.where(active[:, j, None], t, torch.full_like(t, -1.0))
        nl = torch.where((sh == 0)[..., None], n_s, torch.where((sh == 1)[..., None], n_b, n_c))
        # back to world: rotate by +rot about y
        nw = torch.stack([nl[..., 0] * cr + nl[..., 2] * sr, nl[..., 1], -nl[..., 0] * sr + nl[..., 2] * cr], -1)
        take(t, nw, (2 + cls[:, j, None]).expand(n, P), torch.full((n, P), j, dtype=torch.long))
    hit = best_c != SKY
    pts = o + best_t[..., None] * d
    # -- normals facing the camera, in the camera frame --
    nw = best_n / _dot(best_n, best_n).sqrt().clamp(min=EPS)[..., None]
    nw = torch.where((_dot(nw, d) > 0)[..., None], -nw, nw)
    nx1 = -(nw[..., 0] * cy - nw[..., 2] * sy)       # inverse yaw, then the 180-degree turn
    nz1 = -(nw[..., 0] * sy + nw[..., 2] * cy)
    ny2 = nw[..., 1] * cp + nz1 * sp                 # inverse pitch
    nz2 = -nw[..., 1] * sp + nz1 * cp
    n_cam = torch.stack([nx1, ny2, nz2], -1)
    depth = best_t * (-(d_cam[..., 2]))              # z-depth: t times the ray's forward component
    # -- shading --
    pal = _palette(classes + 2)
    c_idx = best_c.clamp(max=classes + 1)
    albedo = pal[c_idx]
    obj_j = best_o.clamp(min=0)
    jit = torch.gather(jitter, 1, obj_j[..., None].expand(n, P, 3))
    albedo = torch.where((best_o >= 0)[..., None], albedo + jit, albedo)
    freq = 3.0 + 2.0 * torch.arange(classes + 2, dtype=f64)
    ang = torch.arange(classes + 2, dtype=f64) * 2.399
    stripe = 0.5 + 0.5 * torch.sin(freq[c_idx] * (pts[..., 0] * torch.cos(ang[c_idx]) + pts[..., 1]
                                                  * torch.sin(ang[c_idx]) + pts[..., 2] * 0.5))
    checker = ((torch.floor(pts[..., 0]) + torch.floor(pts[..., 2])) % 2)
    tex = torch.where(best_c == 0, 0.75 + 0.25 * checker, torch.where(best_c == 1, torch.ones_like(stripe),
                                                                       0.6 + 0.4 * stripe))
    lam = _dot(nw, light[:, None, :]).clamp(min=0)
    col = albedo * tex[..., None] * (0.35 + 0.65 * lam[..., None])
    sky = torch.stack([0.55 + 0.2 * d[..., 1], 0.7 + 0.2 * d[..., 1], torch.full_like(d[..., 1], 0.95)], -1)
    col = torch.where(hit[..., None], col, sky) + pix_noise.reshape(n, P, 3)
    img = (col.clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8)
    # -- labels --
    seg = best_c.reshape(n, R, R)
    bnd = torch.zeros(n, R, R, dtype=torch.bool)
    diff_h = seg[:, :, 1:] != seg[:, :, :-1]
    diff_v = seg[:, 1:, :] != seg[:, :-1, :]
    bnd[:, :, 1:] |= diff_h
    bnd[:, :, :-1] |= diff_h
    bnd[:, 1:, :] |= diff_v
    bnd[:, :-1, :] |= diff_v
    valid = hit.reshape(n, R, R)
    return {
        "images": img.reshape(n, R, R, 3).permute(0, 3, 1, 2).contiguous(),
        "seg": seg.to(torch.uint8),
        "depth": torch.where(hit, depth, torch.zeros_like(depth)).reshape(n, 1, R, R).float(),
        "normal": torch.where(hit[..., None], n_cam, torch.zeros_like(n_cam)).reshape(n, R, R, 3)
                       .permute(0, 3, 1, 2).float().contiguous(),
        "boundary": bnd.reshape(n, 1, R, R).to(torch.uint8),
        "foreground": (best_c >= 2).logical_and(hit).reshape(n, 1, R, R).to(torch.uint8),
        "valid": valid,
    }


TASKS = ("seg", "depth", "normal", "boundary", "foreground")


@register_dataset("scenes")
class Scenes(DatasetAdapter):
    """Embedded 3-D scenes (ray-cast rooms with objects): segmentation, depth, normals, boundaries, foreground."""

    version = "1"
    modality = "image"
    tasks = TASKS
    task_aliases = {"nyu": ("seg", "depth", "normal")}
    default_training = {"epochs": 8, "batch_size": 32, "lr": 2e-3}

    @dataclass
    class Options:
        resolution: int = option_field(64, "image height and width in pixels", minimum=8)
        train: int = option_field(800, "training scenes", minimum=1)
        val: int = option_field(200, "validation scenes", minimum=1)
        test: int = option_field(200, "test scenes", minimum=1)
        classes: int = option_field(4, "object classes (segmentation adds floor and walls)", minimum=1, maximum=250)
        objects: int = option_field(4, "objects per scene", minimum=1)
        fov: float = option_field(70.0, "camera field of view in degrees", minimum=10, maximum=150)
        noise: float = option_field(0.02, "texture noise amplitude", minimum=0, maximum=1)
        data_seed: int | None = option_field(None, "seed of the scenes (none: the run seed)", minimum=0)

        def __post_init__(self) -> None:
            if self.resolution < 8:
                raise ValueError(f"resolution must be at least 8, got {self.resolution}")
            for name in ("train", "val", "test", "classes", "objects"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
            if self.classes > 250:
                raise ValueError(f"classes must be at most 250 (class maps are uint8), got {self.classes}")
            if not 10.0 <= self.fov <= 150.0:
                raise ValueError(f"fov must be in [10, 150] degrees, got {self.fov}")
            if not 0.0 <= self.noise <= 1.0:
                raise ValueError(f"noise must be in [0, 1], got {self.noise}")

    @classmethod
    def image_shape(cls, options):
        o = options or cls.Options()
        return (3, o.resolution, o.resolution)

    @classmethod
    def dense_tasks(cls, options):
        return TASKS

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        data_seed = seed if o.data_seed is None else o.data_seed
        opts = {**asdict(o), "data_seed": data_seed}

        def build():
            g = torch.Generator().manual_seed(data_seed)
            splits = {}
            for name in ("train", "val", "test"):
                t = render(getattr(o, name), o.resolution, o.classes, o.objects, o.fov, o.noise, g)
                n = t["images"].shape[0]
                t["labels"] = torch.zeros(n, len(TASKS))
                t["masks"] = torch.ones(n, len(TASKS), dtype=torch.bool)
                splits[name] = t
            return {"format": "1", "splits": splits}

        payload, _ = cached_tensors("scenes", self.version, opts, {}, build)
        K = o.classes + 2
        tasks = (
            TaskSpec("seg", "segmentation", ("miou", "pixel_acc"), n_classes=K, target="seg", ignore_index=255,
                     description=f"{K} classes: floor, wall, {o.classes} object classes; sky ignored"),
            TaskSpec("depth", "depth", ("abs_err", "rel_err", "delta1"), target="depth", valid="valid",
                     description="z-depth in the camera frame (m)"),
            TaskSpec("normal", "normals", ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"),
                     target="normal", valid="valid", description="unit normals in the camera frame"),
            TaskSpec("boundary", "binary_map", ("best_f",), target="boundary",
                     description="semantic boundaries (4-neighbourhood), HED-balanced BCE"),
            TaskSpec("foreground", "binary_map", ("iou", "best_f"), target="foreground", valid="valid",
                     pos_weight=0.5, description="object pixels vs floor and walls"),
        )
        schema = FeatureSchema(extras=("images", "seg", "depth", "normal", "boundary", "foreground", "valid"),
                               image=ImageSpec(3, o.resolution, o.resolution))
        splits = {s: Split(dict(t)) for s, t in payload["splits"].items()}
        return MultiTaskData("scenes", self.version, schema, tasks, splits,
                             {"data_seed": data_seed, "resolution": o.resolution, "seg_classes": K})
