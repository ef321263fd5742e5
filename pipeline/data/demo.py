"""The built-in demo dataset: synthetic street scenes in RGB, thermal and depth, with labels.

A fair miniature of the real problem, small enough for a CPU. Each scene is ray-cast from a
simple 3-D layout (a camera above a ground plane with a road and grass verges, box buildings
along the street, billboard trees, people, cars and animals standing on the ground), so object
size, position and occlusion follow perspective, and every modality is rendered from the same
geometry by its own sensor model:

- RGB (uint8): day, dusk or night lighting; night is nearly dark and noisy, lit only by a
  few street lamps, windows and car lights, so RGB carries little there.
- thermal (uint16, centikelvin: apparent temperature in kelvin x 100, e.g. 30000 = 300 K):
  people and animals are warm, a car is warm only over its engine (or exhaust), road and
  buildings are sun-heated by day and keep some warmth at night, the sky is cold; soft optics,
  vignetting, one camera's fixed-pattern noise and temporal noise.
- depth (uint16, millimetres of Z-distance along the optical axis; 0 = invalid): stereo-like
  noise growing with distance squared, no return beyond 60 m or from the sky, holes in
  occlusion shadows and random blobs. It does not depend on lighting (an active sensor).

Some objects are camouflaged: their colour copies what is behind them (a grey car before a
grey facade, a person dressed like the hedge), so only depth and thermal separate them.

`generate_demo` writes the generic paired layout (`paired/<split>/<modality>/<name>.png`) plus
unlabeled thermal and depth pools, and optionally the *foundation corpus*
(`foundation/<split>/{rgb,label}/`): RGB-only scenes, biased to daylight as web photographs
are, drawn from random streams of their own seed that no task split or pool shares. The
`foundation` stage pretrains the demo's encoder on it, so that Stage 1 has an RGB prior and a
modality gap to bridge, as SAM 2 does on real thermal or depth images.
`render_scene` returns one scene's arrays for tests. Labels are train ids 0..6 and cover every
pixel, so the ignore index 255 is never used. Every person, car and animal also gets a detection
box: the extents of its visible pixels in the renderer's instance map (classes person, car,
animal; specks of under 6 pixels at 128 px width get none).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from pipeline.data.image_io import encode_png

CLASS_NAMES = ("sky", "road", "building", "vegetation", "person", "car", "animal")
SKY, ROAD, BUILDING, VEGETATION, PERSON, CAR, ANIMAL = range(len(CLASS_NAMES))
# Detection classes: the objects (one box per visible instance), ids into BOX_CLASS_NAMES.
BOX_CLASSES = (PERSON, CAR, ANIMAL)
BOX_CLASS_NAMES = tuple(CLASS_NAMES[c] for c in BOX_CLASSES)
MIN_BOX_PIXELS = 6  # visible pixels an object needs for a box, at REFERENCE_WIDTH
BOXES_DIR = "boxes"  # paired/<split>/boxes/<name>.txt: YOLO text, one line per box
# Cityscapes colours where Cityscapes has the class; animal gets an unused orange.
PALETTE = (
    (70, 130, 180), (128, 64, 128), (70, 70, 70), (107, 142, 35),
    (220, 20, 60), (0, 0, 142), (250, 170, 30),
)
IGNORE_INDEX = 255
CONDITIONS = ("day", "dusk", "night")
SENSORS = ("rgb", "thermal", "depth")
SPLITS = ("train", "val", "test")
# Each (split, scene index) has its own random stream, so resizing one split changes no other.
STREAM_IDS = {"train": 0, "val": 1, "test": 2, "pool_thermal": 3, "pool_depth": 4,
              "foundation_train": 5, "foundation_val": 6}
THERMAL_UNITS = "centikelvin"
DEPTH_UNITS = "millimetres"
DEPTH_INVALID = 0

# Sizes in pixels are given for a 128-pixel-wide image and scale with the width.
REFERENCE_WIDTH = 128

# Camera and layout (metres and degrees).
FOV_DEG = (55.0, 70.0)
CAMERA_HEIGHT_M = (1.2, 1.9)
HORIZON_ROW = (0.36, 0.5)  # fraction of the image height (stands in for camera pitch)
YAW_DEG = 12.0  # street direction relative to the optical axis, +-
OBJECT_DISTANCE_M = (3.5, 35.0)
STOREY_M, WINDOW_SPACING_M = 3.2, 2.8
LIT_GRID = (16, 64)  # storeys x columns of lit-window flags per building, repeated

# Linear reflectances (0..1), per channel.
ROAD_ALBEDO = (0.12, 0.12, 0.13)
LANE_ALBEDO = (0.60, 0.60, 0.55)
GRASS_ALBEDO = (0.09, 0.17, 0.04)
CROWN_ALBEDO = (0.05, 0.11, 0.03)
TRUNK_ALBEDO = (0.10, 0.07, 0.04)
GLASS_ALBEDO = (0.04, 0.05, 0.06)
TYRE_ALBEDO = (0.03, 0.03, 0.03)
FACADE_ALBEDOS = ((0.30, 0.30, 0.30), (0.45, 0.42, 0.36), (0.32, 0.15, 0.09),
                  (0.55, 0.55, 0.52), (0.15, 0.15, 0.17))
CAR_PAINTS = ((0.30, 0.30, 0.30), (0.55, 0.55, 0.56), (0.03, 0.03, 0.03),
              (0.70, 0.70, 0.70), (0.40, 0.04, 0.03), (0.04, 0.10, 0.35))
# Includes greens and greys, so some people are dressed like the vegetation or the walls.
CLOTHES = ((0.03, 0.03, 0.04), (0.05, 0.08, 0.20), (0.25, 0.25, 0.25), (0.50, 0.45, 0.35),
           (0.40, 0.05, 0.05), (0.08, 0.16, 0.05), (0.60, 0.60, 0.60))
FURS = ((0.25, 0.15, 0.07), (0.05, 0.04, 0.03), (0.35, 0.33, 0.30), (0.45, 0.35, 0.20))
SKIN_TONE = (1.0, 0.75, 0.6)
# Light sources, emitted radiance at lamps=1.
WINDOW_GLOW = (0.08, 0.06, 0.035)
HEADLIGHT = (2.0, 2.0, 1.8)
TAILLIGHT = (0.6, 0.02, 0.02)
STREET_LAMP = (2.0, 1.5, 0.9)  # sodium-orange intensity at 1 m
STREET_LAMP_HEIGHT_M = 7.0
RAW_MAX, GAMMA = 4095, 2.2  # 12-bit raw sensor values, gamma-encoded to 8 bits
# Per-class texture: relative albedo modulation by fine and coarse image noise.
ALBEDO_FINE = np.array([0.0, 0.12, 0.06, 0.30, 0.05, 0.03, 0.12])
ALBEDO_COARSE = np.array([0.0, 0.12, 0.08, 0.20, 0.0, 0.0, 0.05])
CAMOUFLAGE_PROBABILITY = 0.3

# Thermal. Absolute temperatures in kelvin; per-condition class temperatures are in LIGHTING.
SKIN_K = 306.0
ENGINE_HEAT_K = (12.0, 30.0)  # hood or exhaust above body temperature, engine running
GLASS_DK = -2.0  # windows reflect the cold sky
SOLAR_GAIN_K = np.array([0.0, 8.0, 6.0, 2.0, 2.0, 8.0, 2.0])  # on a surface facing the sun
THERMAL_TEXTURE_K = np.array([1.0, 1.2, 0.8, 1.5, 0.4, 0.6, 0.5])
SKY_ZENITH_DK = -35.0  # clear sky is far colder overhead than at the horizon
THERMAL_BLUR_PX = 1.0  # soft germanium optics
VIGNETTING_K = (0.3, 1.5)  # edges read this much cooler than the centre
COLUMN_NOISE_K, ROW_NOISE_K, GAIN_NONUNIFORMITY = 0.2, 0.05, 0.01
NETD_K = 0.05  # temporal noise
FIXED_PATTERN_SEED = 20240601  # one simulated thermal camera for every scene and seed

# Depth: a stereo-like sensor. Noise uses the full-resolution sensor's focal x baseline; the
# occlusion shadows use this image's focal, so they scale with the image.
DEPTH_MAX_M = 60.0
STEREO_FOCAL_BASELINE = 84.0  # pixels x metres (e.g. 700 px focal, 12 cm baseline)
STEREO_BASELINE_M = 0.12
DISPARITY_NOISE_PX = 0.08  # gives sigma_z = z^2 * 0.08 / 84: 10 cm at 10 m, 3.4 m at 60 m
DEPTH_DROPOUT = 0.003


@dataclass(frozen=True)
class Lighting:
    """What a condition changes: light, camera gain and noise, surface temperatures."""

    sun: float  # direct sunlight on a surface facing the sun (daylight white = about 1)
    sun_tint: tuple[float, float, float]
    sun_elevation_deg: tuple[float, float]
    ambient: tuple[float, float, float]  # skylight reaching every surface
    sky_zenith: tuple[float, float, float]  # radiance of the sky overhead ...
    sky_horizon: tuple[float, float, float]  # ... and at the horizon
    lamps: float  # street lamps, lit windows and car lights (0 = off)
    lit_windows: float  # fraction of windows lit from inside
    exposure: float  # camera gain: auto-exposure compensates dusk, runs out at night
    read_noise: float
    shot_noise: float
    temperature_k: tuple[float, ...]  # per class: sky at the horizon, road, ..., animal fur


LIGHTING = {
    "day": Lighting(
        sun=0.8, sun_tint=(1.0, 0.96, 0.9), sun_elevation_deg=(25, 65),
        ambient=(0.28, 0.31, 0.36), sky_zenith=(0.22, 0.38, 0.75), sky_horizon=(0.65, 0.72, 0.85),
        lamps=0.0, lit_windows=0.0, exposure=1.0, read_noise=0.002, shot_noise=0.002,
        temperature_k=(278, 303, 296, 293, 303, 296, 302),
    ),
    "dusk": Lighting(
        sun=0.25, sun_tint=(1.0, 0.55, 0.3), sun_elevation_deg=(3, 12),
        ambient=(0.06, 0.06, 0.09), sky_zenith=(0.05, 0.07, 0.16), sky_horizon=(0.5, 0.28, 0.14),
        lamps=0.4, lit_windows=0.2, exposure=2.5, read_noise=0.004, shot_noise=0.003,
        temperature_k=(272, 298, 293, 289, 300, 292, 299),
    ),
    "night": Lighting(
        sun=0.0, sun_tint=(0.0, 0.0, 0.0), sun_elevation_deg=(-30, -10),
        ambient=(0.003, 0.0035, 0.005), sky_zenith=(0.002, 0.003, 0.006),
        sky_horizon=(0.02, 0.016, 0.012),  # light pollution
        lamps=1.0, lit_windows=0.3, exposure=4.0, read_noise=0.006, shot_noise=0.004,
        temperature_k=(265, 290, 288, 281, 298, 285, 297),
    ),
}


# ----------------------------------------------------------------------------- scene layout


@dataclass(frozen=True)
class Camera:
    height: float  # metres above the ground
    focal: float  # pixels
    horizon: float  # image row of the horizon
    yaw: float  # radians between the street axis (world z) and the optical axis


@dataclass(frozen=True)
class Box:
    """An axis-aligned box standing on the ground: a building, or a hedge (no windows)."""

    lo: tuple[float, float, float]  # world corners (x, y, z), metres
    hi: tuple[float, float, float]
    label: int
    albedo: tuple[float, float, float]
    temperature: float
    lit: np.ndarray | None  # storeys x columns: window lit from inside; None = no windows


@dataclass(frozen=True)
class Thing:
    """A flat cut-out standing on the ground at (x, z), facing down the street.

    `parts(a, b)` maps metres right of centre and above the ground to part ids (0 = not the
    thing); the tables give each part's albedo, emission and temperature. `paint_parts` are
    the parts (clothes, car paint, fur) a camouflaged thing colours like its background.
    """

    label: int
    x: float
    z: float
    half_width: float
    height: float
    parts: Callable[[np.ndarray, np.ndarray], np.ndarray]
    albedo: np.ndarray  # (parts + 1, 3)
    emission: np.ndarray  # (parts + 1, 3)
    temperature: np.ndarray  # (parts + 1,)
    paint_parts: tuple[int, ...] = ()
    camouflaged: bool = False


@dataclass(frozen=True)
class Scene:
    """The random layout of one scene: camera, geometry, materials, lights, texture noise."""

    camera: Camera
    road_x: float  # road centre line, world x
    road_half_width: float
    road_albedo: np.ndarray
    grass_albedo: np.ndarray
    sun_dir: np.ndarray  # unit vector towards the sun
    boxes: list[Box]
    trees: list[Thing]
    objects: list[Thing]
    lamps: np.ndarray  # (n, 3) street lamp positions
    fine: np.ndarray  # HxW unit-variance noise fields for textures
    coarse: np.ndarray
    heat: np.ndarray


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(size), sigma, mode="wrap")
    return field / field.std()


def _jitter(rng: np.random.Generator, colour: tuple[float, ...], spread: float) -> np.ndarray:
    """A colour scaled in brightness and, a little, per channel: no two instances alike."""
    return np.clip(np.array(colour) * rng.uniform(1 - spread, 1 + spread) *
                   rng.uniform(0.9, 1.1, 3), 0.0, 0.9)


def _pick(rng: np.random.Generator, colours: tuple[tuple[float, float, float], ...]) -> tuple:
    return colours[rng.integers(len(colours))]


def _sample_scene(rng: np.random.Generator, size: tuple[int, int], light: Lighting) -> Scene:
    height, width = size
    fov = np.deg2rad(rng.uniform(*FOV_DEG))
    camera = Camera(
        height=rng.uniform(*CAMERA_HEIGHT_M),
        focal=width / 2 / np.tan(fov / 2),
        horizon=rng.uniform(*HORIZON_ROW) * height,
        yaw=np.deg2rad(rng.uniform(-YAW_DEG, YAW_DEG)),
    )
    road_half_width = rng.uniform(3.0, 6.0)
    road_x = rng.uniform(-0.6, 0.2) * road_half_width  # the camera drives in the right lane

    # Street sides: a row of buildings set back behind a grass verge, or open land.
    boxes, fronts = [], []
    for side in (-1, 1):
        edge = road_x + side * road_half_width
        if rng.random() < 0.85:
            front = edge + side * rng.uniform(1.5, 8.0)
            boxes += _building_row(rng, front, side, camera.height, light)
        else:
            front = edge + side * 15.0
        fronts.append(front)
        if rng.random() < 0.4:
            boxes.append(_hedge(rng, edge, front, side, camera.height, light))
    if rng.random() < 0.5:  # a building closing the end of the street
        z0 = rng.uniform(50.0, 140.0)
        boxes.append(_building(rng, (road_x - 40, road_x + 40), (z0, z0 + 15),
                               rng.uniform(6.0, 30.0), camera.height, light))
    free = (fronts[0] + 0.3, fronts[1] - 0.3)  # where things may stand

    trees = []
    for _ in range(rng.poisson(4.0)):
        tree = _tree(rng, light)
        near = road_half_width + 0.5 + tree.half_width  # between the road and the buildings
        x_range = ((road_x + near, fronts[1] - tree.half_width) if rng.random() < 0.5
                   else (fronts[0] + tree.half_width, road_x - near))
        placed = _place(rng, tree, x_range, (3.0, 80.0), camera, width)
        if placed is not None:
            trees.append(placed)

    objects = []
    road = (road_x - road_half_width, road_x + road_half_width)
    for _ in range(2 + rng.poisson(4.0)):
        kind = rng.choice((PERSON, CAR, ANIMAL), p=(0.45, 0.35, 0.2))
        thing = {PERSON: _person, CAR: _car, ANIMAL: _animal}[kind](rng, light)
        lo, hi = road if kind == CAR and rng.random() < 0.75 else free  # most cars drive
        x_range = (lo + thing.half_width, hi - thing.half_width)
        placed = _place(rng, thing, x_range, OBJECT_DISTANCE_M, camera, width)
        if placed is not None:
            objects.append(placed)

    elevation = np.deg2rad(rng.uniform(*light.sun_elevation_deg))
    azimuth = rng.uniform(0, 2 * np.pi)
    sun_dir = np.array([np.cos(elevation) * np.sin(azimuth), np.sin(elevation),
                        np.cos(elevation) * np.cos(azimuth)])
    spacing = rng.uniform(20.0, 35.0)
    lamp_z = np.arange(rng.uniform(0.0, spacing), 120.0, spacing)
    lamp_x = road_x + rng.choice((-1, 1), len(lamp_z)) * (road_half_width + 0.5)
    lamps = np.stack([lamp_x, np.full_like(lamp_z, STREET_LAMP_HEIGHT_M - camera.height),
                      lamp_z], axis=1)

    scale = width / REFERENCE_WIDTH
    return Scene(
        camera=camera,
        road_x=road_x,
        road_half_width=road_half_width,
        road_albedo=_jitter(rng, ROAD_ALBEDO, 0.3),
        grass_albedo=_jitter(rng, GRASS_ALBEDO, 0.3),
        sun_dir=sun_dir,
        boxes=boxes,
        trees=trees,
        objects=objects,
        lamps=lamps,
        fine=_smooth_noise(rng, size, 0.5 * scale),
        coarse=_smooth_noise(rng, size, 6.0 * scale),
        heat=_smooth_noise(rng, size, 3.0 * scale),
    )


def _building(rng: np.random.Generator, x: tuple[float, float], z: tuple[float, float],
              height: float, camera_height: float, light: Lighting) -> Box:
    return Box(
        lo=(min(x), -camera_height, min(z)),
        hi=(max(x), height - camera_height, max(z)),
        label=BUILDING,
        albedo=tuple(_jitter(rng, _pick(rng, FACADE_ALBEDOS), 0.2)),
        temperature=light.temperature_k[BUILDING] + rng.normal(0.0, 1.0),
        lit=rng.random(LIT_GRID) < light.lit_windows,
    )


def _building_row(rng: np.random.Generator, front: float, side: int, camera_height: float,
                  light: Lighting) -> list[Box]:
    """Buildings of varied length, height and setback along one side, with some gaps."""
    boxes, z = [], rng.uniform(-15.0, 0.0)
    while z < 110.0:
        if rng.random() < 0.3:
            z += rng.uniform(3.0, 12.0)
        length = rng.uniform(8.0, 30.0)
        x_front = front + side * rng.uniform(0.0, 1.5)
        x = (x_front, x_front + side * rng.uniform(8.0, 20.0))
        boxes.append(_building(rng, x, (z, z + length), rng.uniform(4.0, 25.0), camera_height,
                               light))
        z += length
    return boxes


def _hedge(rng: np.random.Generator, edge: float, front: float, side: int, camera_height: float,
           light: Lighting) -> Box:
    x0 = edge + side * rng.uniform(0.3, max(0.4, abs(front - edge) - 1.5))
    x = (x0, x0 + side * rng.uniform(0.6, 1.2))
    z0 = rng.uniform(2.0, 40.0)
    return Box(
        lo=(min(x), -camera_height, z0),
        hi=(max(x), rng.uniform(0.6, 1.6) - camera_height, z0 + rng.uniform(4.0, 20.0)),
        label=VEGETATION,
        albedo=tuple(_jitter(rng, CROWN_ALBEDO, 0.3)),
        temperature=light.temperature_k[VEGETATION] + rng.normal(0.0, 0.7),
        lit=None,
    )


def _place(rng: np.random.Generator, thing: Thing, x_range: tuple[float, float],
           z_range: tuple[float, float], camera: Camera, width: int) -> Thing | None:
    """Stand a thing at a random spot in range that the camera sees (None if none found)."""
    if x_range[0] >= x_range[1]:
        return None
    for _ in range(20):
        x = rng.uniform(*x_range)
        z = np.exp(rng.uniform(*np.log(z_range)))  # log-uniform: near things are common enough
        x_cam = np.cos(camera.yaw) * x - np.sin(camera.yaw) * z
        z_cam = np.sin(camera.yaw) * x + np.cos(camera.yaw) * z
        if z_cam > 2.0 and abs(x_cam / z_cam * camera.focal) < 0.45 * width:
            return replace(thing, x=x, z=z)
    return None


def _table(*rows: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """A per-part table whose row 0 (not the thing) is zero."""
    return np.array([np.zeros_like(np.asarray(rows[0], dtype=float)), *rows], dtype=float)


def _tree(rng: np.random.Generator, light: Lighting) -> Thing:
    crown, trunk = rng.uniform(1.2, 3.0), rng.uniform(1.5, 3.0)
    warmth = light.temperature_k[VEGETATION] + rng.normal(0.0, 0.7)
    return Thing(
        label=VEGETATION, x=0.0, z=0.0, half_width=1.2 * crown, height=trunk + 2.4 * crown,
        parts=partial(_tree_parts, trunk=trunk, crown=crown, phase=rng.uniform(0, 2 * np.pi)),
        albedo=_table(_jitter(rng, CROWN_ALBEDO, 0.3), _jitter(rng, TRUNK_ALBEDO, 0.2)),
        emission=_table((0, 0, 0), (0, 0, 0)),
        temperature=_table(warmth, warmth + 1.0),
    )


def _person(rng: np.random.Generator, light: Lighting) -> Thing:
    height = rng.uniform(1.5, 1.95)
    clothes = light.temperature_k[PERSON] + rng.normal(0.0, 1.0)
    return Thing(
        label=PERSON, x=0.0, z=0.0, half_width=0.17 * height, height=height,
        parts=partial(_person_parts, height=height),
        albedo=_table(np.array(SKIN_TONE) * rng.uniform(0.15, 0.55),  # head, shirt, trousers
                      *(_jitter(rng, _pick(rng, CLOTHES), 0.2) for _ in range(2))),
        emission=_table((0, 0, 0), (0, 0, 0), (0, 0, 0)),
        temperature=_table(SKIN_K + rng.normal(0.0, 0.5), clothes, clothes - 1.0),
        paint_parts=(2, 3),
        camouflaged=rng.random() < CAMOUFLAGE_PROBABILITY,
    )


def _car(rng: np.random.Generator, light: Lighting) -> Thing:
    view = rng.choice(("side", "front", "rear"), p=(0.4, 0.2, 0.4))
    length = rng.uniform(3.8, 4.8)
    facing = rng.choice((-1, 1))
    paint = _jitter(rng, _pick(rng, CAR_PAINTS), 0.15)
    body = light.temperature_k[CAR] + rng.normal(0.0, 1.0)
    running = rng.random() < 0.7
    engine = body + (rng.uniform(*ENGINE_HEAT_K) if running else 0.0)
    lamp = TAILLIGHT if view == "rear" else HEADLIGHT
    return Thing(
        label=CAR, x=0.0, z=0.0, half_width=length / 2 if view == "side" else 0.9, height=1.45,
        parts=partial(_car_parts, view=view, length=length, facing=facing),
        albedo=_table(paint, GLASS_ALBEDO, TYRE_ALBEDO, paint, np.array(lamp) / max(lamp) * 0.6),
        emission=_table((0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0),
                        lamp if running else (0, 0, 0)),
        temperature=_table(body, body + GLASS_DK, body + (5.0 if running else 0.0), engine,
                           body + (10.0 if running else 0.0)),
        paint_parts=(1, 4),
        camouflaged=rng.random() < CAMOUFLAGE_PROBABILITY,
    )


def _animal(rng: np.random.Generator, light: Lighting) -> Thing:
    length = rng.uniform(0.6, 1.6)
    fur = _jitter(rng, _pick(rng, FURS), 0.2)
    warmth = light.temperature_k[ANIMAL] + rng.normal(0.0, 1.0)
    return Thing(
        label=ANIMAL, x=0.0, z=0.0, half_width=0.65 * length, height=length,
        parts=partial(_animal_parts, length=length, facing=rng.choice((-1, 1))),
        albedo=_table(fur, fur * 0.8),
        emission=_table((0, 0, 0), (0, 0, 0)),
        temperature=_table(warmth, warmth + 3.0),  # eyes and nose are warmer than fur
        paint_parts=(1, 2),
        camouflaged=rng.random() < CAMOUFLAGE_PROBABILITY,
    )


# ----------------------------------------------------------------------------- shapes
# (a, b): metres right of the thing's centre and above the ground, per pixel.


def _ellipse(a: np.ndarray, b: np.ndarray, ca: float, cb: float, ra: float, rb: float,
             power: int = 2) -> np.ndarray:
    return np.abs((a - ca) / ra) ** power + np.abs((b - cb) / rb) ** power < 1


def _person_parts(a: np.ndarray, b: np.ndarray, height: float) -> np.ndarray:
    """1 skin (head), 2 shirt (torso and arms), 3 trousers (legs)."""
    h, side = height, np.abs(a)
    head = _ellipse(a, b, 0.0, 0.925 * h, 0.065 * h, 0.075 * h)
    torso = (side < 0.13 * h) & (b > 0.47 * h) & (b < 0.85 * h)
    arms = (side < 0.17 * h) & (b > 0.5 * h) & (b < 0.83 * h)
    legs = (side > 0.012 * h) & (side < 0.1 * h) & (b >= 0) & (b <= 0.48 * h)
    return np.select([head, torso | arms, legs], [1, 2, 3], 0)


def _car_parts(a: np.ndarray, b: np.ndarray, view: str, length: float, facing: int) -> np.ndarray:
    """1 paint, 2 glass, 3 tyres, 4 paint over the engine (front) or exhaust (rear), 5 lamps."""
    if view == "side":
        half, forward = length / 2, a * facing
        body = _ellipse(a, b, 0.0, 0.6, half, 0.33, power=4)
        rear_shift = -0.1 * half * facing
        cabin_half = half * (0.55 - 0.4 * (b - 0.9))
        cabin = (b >= 0.9) & (b < 1.42) & (np.abs(a - rear_shift) < cabin_half)
        glass = cabin & (b < 1.36) & (np.abs(a - rear_shift) < cabin_half - 0.12)
        tyres = (np.abs(a) - 0.62 * half) ** 2 + (b - 0.32) ** 2 < 0.32**2
        lamps = body & (forward > 0.9 * half) & (np.abs(b - 0.7) < 0.08)
        engine = body & (forward > 0.35 * half)
    else:
        half, side = 0.9, np.abs(a)
        body = _ellipse(a, b, 0.0, 0.6, half, 0.33, power=6)
        cabin_half = half * (0.8 - 0.36 * (b - 0.9))
        cabin = (b >= 0.9) & (b < 1.45) & (side < cabin_half)
        glass = cabin & (b < 1.38) & (side < cabin_half - 0.1)
        tyres = (side > 0.55 * half) & (side < 0.85 * half) & (b >= 0) & (b < 0.3)
        lamps = _ellipse(side, b, 0.72 * half, 0.72, 0.14, 0.08)
        if view == "front":  # radiator and hood
            engine = body & (b < 0.9) & (side < 0.6 * half)
        else:
            engine = _ellipse(a, b, 0.5 * half * facing, 0.32, 0.12, 0.08)
    return np.select([tyres, lamps, glass, engine, body | cabin], [3, 5, 2, 4, 1], 0)


def _animal_parts(a: np.ndarray, b: np.ndarray, length: float, facing: int) -> np.ndarray:
    """1 fur (body, legs, neck), 2 head; a four-legged animal seen from the side."""
    s, f = length, a * facing  # f grows towards the head
    body = _ellipse(f, b, 0.0, 0.6 * s, 0.42 * s, 0.17 * s)
    legs = (b >= 0) & (b < 0.6 * s) & np.any(
        [np.abs(f - c * s) < 0.035 * s for c in (-0.3, -0.2, 0.18, 0.28)], axis=0)
    neck = _ellipse(f, b, 0.42 * s, 0.78 * s, 0.07 * s, 0.16 * s)
    head = _ellipse(f, b, 0.52 * s, 0.92 * s, 0.12 * s, 0.08 * s)
    return np.select([head, body | legs | neck], [2, 1], 0)


def _tree_parts(a: np.ndarray, b: np.ndarray, trunk: float, crown: float, phase: float) -> np.ndarray:
    """1 crown (ragged outline), 2 trunk."""
    dy = b - trunk - crown
    angle = np.arctan2(dy, a)
    ragged = crown * (1 + 0.12 * np.sin(5 * angle + phase) + 0.06 * np.sin(11 * angle + 2 * phase))
    leaves = np.hypot(a, dy) < ragged
    stem = (np.abs(a) < 0.12 + 0.02 * crown) & (b >= 0) & (b < trunk + crown)
    return np.select([leaves, stem], [1, 2], 0)


# ----------------------------------------------------------------------------- ray casting
# Vectors and colours per pixel are channel-first (3, H, W): NumPy masks and broadcasts those
# several times faster than (H, W, 3).

Region = tuple[slice, slice]  # rows, columns of the image
FULL: Region = (slice(None), slice(None))


def _channels(values: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """A per-channel constant shaped (3, 1, 1), to broadcast against (3, H, W)."""
    return np.reshape(values, (-1, 1, 1))


@dataclass
class Surfaces:
    """Per pixel, the nearest surface along the camera ray and what each sensor needs of it."""

    depth: np.ndarray  # Z distance in metres; inf where the ray escapes to the sky
    label: np.ndarray  # uint8 train ids
    albedo: np.ndarray  # (3, H, W) linear reflectance
    normal: np.ndarray  # (3, H, W) world unit normal; 0 for the sky
    emission: np.ndarray  # (3, H, W) light sent to the camera whatever the lighting
    temperature: np.ndarray  # kelvin, before sun heating
    camouflaged: np.ndarray  # bool: object parts coloured like their background
    instance: np.ndarray  # int32: 1 + index of the object seen there (person, car, animal); 0 elsewhere

    def paint(self, hit: np.ndarray, depth: np.ndarray, label, albedo, normal, emission,
              temperature, camouflaged=False, region: Region = FULL, instance: int = 0) -> None:
        """Z-buffer: within `region`, take over the pixels in `hit` where this surface is
        nearer. Arguments are arrays of the region's shape (channel-first for colours and
        normals) or broadcast to it."""
        win = hit & (depth < self.depth[region])
        np.copyto(self.depth[region], depth, where=win)
        np.copyto(self.label[region], label, where=win, casting="unsafe")
        np.copyto(self.albedo[:, *region], albedo, where=win)
        np.copyto(self.normal[:, *region], normal, where=win)
        np.copyto(self.emission[:, *region], emission, where=win)
        np.copyto(self.temperature[region], temperature, where=win)
        np.copyto(self.camouflaged[region], camouflaged, where=win)
        np.copyto(self.instance[region], instance, where=win)


def _rays(camera: Camera, size: tuple[int, int]) -> np.ndarray:
    """World directions (3, H, W) of the pixel rays, scaled so the ray parameter is the Z
    distance."""
    v, u = np.mgrid[0 : size[0], 0 : size[1]] + 0.5
    x = (u - size[1] / 2) / camera.focal
    y = (camera.horizon - v) / camera.focal
    cos, sin = np.cos(camera.yaw), np.sin(camera.yaw)
    return np.stack([cos * x + sin, y, cos - sin * x])  # (x, y, 1) turned by the yaw


def _sky(rays: np.ndarray, light: Lighting) -> tuple[np.ndarray, np.ndarray]:
    """Radiance and temperature of the sky: bright and mild near the horizon, cold overhead."""
    elevation = np.arcsin(np.clip(rays[1] / np.linalg.norm(rays, axis=0), 0, 1))
    near_horizon = np.exp(-elevation / 0.3)
    zenith, horizon = _channels(light.sky_zenith), _channels(light.sky_horizon)
    radiance = zenith + (horizon - zenith) * near_horizon
    kelvin = light.temperature_k[SKY] + SKY_ZENITH_DK * (1 - np.exp(-elevation / 0.2))
    return radiance, kelvin


def _irradiance(normal: np.ndarray, scene: Scene, light: Lighting) -> np.ndarray:
    """Skylight plus direct sun (no cast shadows) on surfaces with channel-first `normal`."""
    facing = np.clip(np.tensordot(scene.sun_dir, normal, axes=1), 0, None)
    shape = (3,) + (1,) * (normal.ndim - 1)
    sun = light.sun * np.reshape(light.sun_tint, shape)
    return np.reshape(light.ambient, shape) + sun * facing


def _paint_ground(surf: Surfaces, rays: np.ndarray, scene: Scene, light: Lighting) -> None:
    with np.errstate(divide="ignore", invalid="ignore"):  # rays at or above the horizon
        t = np.where(rays[1] < 0, -scene.camera.height / rays[1], np.inf)
        x, z = t * rays[0], t * rays[2]
        dashes = z % 6.0 < 3.0
    across = np.abs(x - scene.road_x)
    road = across < scene.road_half_width
    hw = scene.road_half_width
    markings = road & ((across < 0.08) & dashes | (across > hw - 0.3) & (across < hw - 0.15))
    albedo = np.where(road, _channels(scene.road_albedo), _channels(scene.grass_albedo))
    albedo = np.where(markings, _channels(LANE_ALBEDO), albedo)
    kelvin = np.where(road, light.temperature_k[ROAD], light.temperature_k[VEGETATION])
    label = np.where(road, ROAD, VEGETATION)
    surf.paint(np.isfinite(t), t, label, albedo, _channels((0, 1, 0)), 0.0, kelvin)


def _paint_boxes(surf: Surfaces, rays: np.ndarray, boxes: list[Box], scene: Scene,
                 light: Lighting) -> None:
    """Slab test against each box, keeping the nearest hit per pixel; facades get a grid of
    windows, some lit at night."""
    if not boxes:
        return
    size = rays.shape[1:]
    inverse = (1 / rays).astype(np.float32)  # float32: the slab tests are the bulk of the work
    lo = np.array([box.lo for box in boxes], dtype=np.float32)
    hi = np.array([box.hi for box in boxes], dtype=np.float32)
    t = np.full(size, np.inf, dtype=np.float32)
    index = np.zeros(size, dtype=np.intp)  # the nearest box along each ray
    for i, box in enumerate(boxes):
        region = _screen_region(box.lo, box.hi, scene.camera, size)
        if region is None:
            continue
        t0, t1 = _channels(lo[i]) * inverse[:, *region], _channels(hi[i]) * inverse[:, *region]
        near, far = np.minimum(t0, t1), np.maximum(t0, t1)
        enter = np.maximum(np.maximum(near[0], near[1]), near[2])
        leave = np.minimum(np.minimum(far[0], far[1]), far[2])
        nearer = (enter < leave) & (enter > 0) & (enter < t[region])
        np.copyto(t[region], enter, where=nearer)
        np.copyto(index[region], i, where=nearer)
    t = t.astype(float)
    hit = np.isfinite(t)
    # The face a ray enters belongs to the slab it enters last.
    t0, t1 = lo.T[:, index] * inverse, hi.T[:, index] * inverse
    axis = np.minimum(t0, t1).argmax(axis=0)
    normal = -np.sign(rays) * (np.arange(3)[:, None, None] == axis)
    point = rays * np.where(hit, t, 0)
    above = point[1] + scene.camera.height
    along = np.where(axis == 0, point[2], point[0])
    storey, column = np.floor(above / STOREY_M), np.floor(along / WINDOW_SPACING_M)
    window = (
        np.array([box.lit is not None for box in boxes])[index]
        & (axis != 1)
        & (point[1] < hi[index, 1] - 1.0)
        & (np.abs(above / STOREY_M - storey - 0.575) < 0.225)
        & (np.abs(along / WINDOW_SPACING_M - column - 0.45) < 0.25)
    )
    lit_grids = np.array([np.zeros(LIT_GRID, bool) if box.lit is None else box.lit for box in boxes])
    lit = window & lit_grids[index, storey.astype(int) % LIT_GRID[0], column.astype(int) % LIT_GRID[1]]
    albedo = np.array([box.albedo for box in boxes]).T[:, index]
    albedo = np.where(window, _channels(GLASS_ALBEDO), albedo)
    emission = np.where(lit, _channels(WINDOW_GLOW) * light.lamps, 0.0)
    kelvin = np.array([box.temperature for box in boxes])[index]
    kelvin = kelvin + np.where(lit, -GLASS_DK, np.where(window, GLASS_DK, 0.0))
    label = np.array([box.label for box in boxes])[index]
    surf.paint(hit, t, label, albedo, normal, emission, kelvin)


def _screen_region(lo: tuple[float, float, float], hi: tuple[float, float, float],
                   camera: Camera, size: tuple[int, int]) -> Region | None:
    """The image rectangle covering the world box `lo`..`hi`: the whole image when part of
    the box is behind the camera, None when the box is off the image."""
    cos, sin = math.cos(camera.yaw), math.sin(camera.yaw)
    us, vs = [], []
    for x, z in itertools.product((lo[0], hi[0]), (lo[2], hi[2])):
        z_cam = sin * x + cos * z
        if z_cam < 0.1:
            return FULL
        us.append(size[1] / 2 + camera.focal * (cos * x - sin * z) / z_cam)
        vs += [camera.horizon - camera.focal * y / z_cam for y in (lo[1], hi[1])]
    v0, v1 = max(math.floor(min(vs)) - 1, 0), min(math.ceil(max(vs)) + 1, size[0])
    u0, u1 = max(math.floor(min(us)) - 1, 0), min(math.ceil(max(us)) + 1, size[1])
    return (slice(v0, v1), slice(u0, u1)) if v0 < v1 and u0 < u1 else None


def _paint_thing(surf: Surfaces, rays: np.ndarray, thing: Thing, scene: Scene,
                 light: Lighting, instance: int = 0) -> None:
    """A cut-out standing at `thing.z`, drawn where its shape covers a ray first (marked
    `instance` in the instance map)."""
    lo = (thing.x - thing.half_width, -scene.camera.height, thing.z)
    hi = (thing.x + thing.half_width, thing.height - scene.camera.height, thing.z)
    region = _screen_region(lo, hi, scene.camera, rays.shape[1:])
    if region is None:
        return
    rays = rays[:, *region]
    t = thing.z / rays[2]
    a = t * rays[0] - thing.x
    b = t * rays[1] + scene.camera.height
    parts = thing.parts(a, b)
    # A little relief: the middle of a thing is nearer than its outline.
    relief = min(0.5 * thing.half_width, 1.0)
    depth = t - relief * np.sqrt(np.clip(1 - (a / thing.half_width) ** 2, 0, 1))
    visible = (parts > 0) & (depth < surf.depth[region])
    if not visible.any():
        return
    normal = _channels((0, 0, -1))
    albedo = thing.albedo
    if thing.camouflaged:
        # Each painted part copies the median colour of what it hides under sun and sky.
        seen = (surf.albedo[:, *region] * _irradiance(surf.normal[:, *region], scene, light)
                + surf.emission[:, *region])
        albedo = albedo.copy()
        for part in thing.paint_parts:
            hides = visible & (parts == part)
            if hides.any():
                behind = np.median(seen[:, hides], axis=1)
                albedo[part] = np.clip(behind / _irradiance(normal, scene, light)[:, 0, 0], 0, 0.9)
    camouflaged = np.isin(parts, thing.paint_parts) if thing.camouflaged else False
    surf.paint(visible, depth, thing.label, albedo.T[:, parts], normal,
               thing.emission.T[:, parts] * light.lamps, thing.temperature[parts], camouflaged,
               region, instance)


def _trace(scene: Scene, size: tuple[int, int], light: Lighting) -> Surfaces:
    rays = _rays(scene.camera, size)
    sky_radiance, sky_kelvin = _sky(rays, light)
    surf = Surfaces(
        depth=np.full(size, np.inf),
        label=np.full(size, SKY, dtype=np.uint8),
        albedo=np.zeros((3, *size)),
        normal=np.zeros((3, *size)),
        emission=sky_radiance * (1 + 0.05 * scene.coarse),
        temperature=sky_kelvin,
        camouflaged=np.zeros(size, dtype=bool),
        instance=np.zeros(size, dtype=np.int32),
    )
    _paint_ground(surf, rays, scene, light)
    _paint_boxes(surf, rays, scene.boxes, scene, light)
    for tree in scene.trees:
        _paint_thing(surf, rays, tree, scene, light)
    # Far to near, so a camouflaged object copies what is really behind it.
    for instance, thing in sorted(enumerate(scene.objects, start=1), key=lambda item: -item[1].z):
        _paint_thing(surf, rays, thing, scene, light, instance)
    texture = 1 + ALBEDO_FINE[surf.label] * scene.fine + ALBEDO_COARSE[surf.label] * scene.coarse
    surf.albedo *= np.clip(texture, 0.2, None)
    return surf


# ----------------------------------------------------------------------------- sensors


def _rgb_camera(surf: Surfaces, scene: Scene, light: Lighting, rng: np.random.Generator) -> np.ndarray:
    irradiance = _irradiance(surf.normal, scene, light)
    if light.lamps:
        # Inverse-square light from each lamp, expanded so one product serves all lamps.
        point = _rays(scene.camera, surf.depth.shape) * np.where(np.isfinite(surf.depth), surf.depth, 0)
        distance2 = (np.sum(scene.lamps**2, axis=1)[:, None, None]
                     - 2 * np.tensordot(scene.lamps, point, axes=1) + np.sum(point**2, axis=0))
        facing = np.tensordot(scene.lamps, surf.normal, axes=1) - np.sum(surf.normal * point, axis=0)
        lamplight = np.sum(np.clip(facing, 0, None) / distance2**1.5, axis=0)
        irradiance = irradiance + _channels(STREET_LAMP) * light.lamps * lamplight
    radiance = surf.albedo * irradiance + surf.emission
    sigma = 0.5 * surf.depth.shape[1] / REFERENCE_WIDTH  # lens blur, and it softens jaggies
    radiance = ndimage.gaussian_filter(radiance, (0, sigma, sigma))
    signal = radiance * light.exposure * rng.uniform(0.8, 1.25)
    noise = np.sqrt(light.read_noise**2 + light.shot_noise * signal) * rng.standard_normal(signal.shape)
    raw = np.round(np.clip(signal + noise, 0, 1) * RAW_MAX).astype(np.intp)
    return np.ascontiguousarray(np.moveaxis(_gamma_table()[raw], 0, -1))


@lru_cache(maxsize=1)
def _gamma_table() -> np.ndarray:
    """8-bit display values of the raw levels: the camera's gamma curve as a look-up table."""
    return np.round(255 * (np.arange(RAW_MAX + 1) / RAW_MAX) ** (1 / GAMMA)).astype(np.uint8)


@lru_cache(maxsize=8)
def _thermal_fixed_pattern(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Column/row offsets (K) and per-pixel gain of the one simulated thermal camera:
    fixed across scenes, as on a real camera between non-uniformity corrections."""
    rng = np.random.default_rng(FIXED_PATTERN_SEED)
    offset = (COLUMN_NOISE_K * rng.standard_normal(size[1])[None, :]
              + ROW_NOISE_K * rng.standard_normal(size[0])[:, None])
    gain = 1 + GAIN_NONUNIFORMITY * rng.standard_normal(size)
    return offset, gain


def _thermal_camera(surf: Surfaces, scene: Scene, light: Lighting,
                    rng: np.random.Generator) -> np.ndarray:
    size = surf.depth.shape
    sunlit = np.clip(np.tensordot(scene.sun_dir, surf.normal, axes=1), 0, None)
    kelvin = (surf.temperature + SOLAR_GAIN_K[surf.label] * light.sun * sunlit
              + THERMAL_TEXTURE_K[surf.label] * scene.heat)
    kelvin = ndimage.gaussian_filter(kelvin, THERMAL_BLUR_PX * size[1] / REFERENCE_WIDTH)
    v, u = np.mgrid[0 : size[0], 0 : size[1]]
    radius2 = ((2 * v / (size[0] - 1) - 1) ** 2 + (2 * u / (size[1] - 1) - 1) ** 2) / 2
    kelvin = kelvin - rng.uniform(*VIGNETTING_K) * radius2
    offset, gain = _thermal_fixed_pattern(size)
    reference = light.temperature_k[ROAD]  # gain errors scale the distance from a mid value
    kelvin = (reference + (kelvin - reference) * gain + rng.uniform(0.7, 1.3) * offset
              + NETD_K * rng.standard_normal(size))
    return np.clip(np.round(kelvin * 100), 0, 65535).astype(np.uint16)


def _depth_sensor(surf: Surfaces, scene: Scene, light: Lighting, rng: np.random.Generator) -> np.ndarray:
    """Independent of `light`: an active sensor."""
    z = surf.depth
    size = z.shape
    valid = z <= DEPTH_MAX_M  # the sky (inf) and far surfaces give no return
    # Noise is Gaussian in disparity, so it grows with distance squared.
    disparity = STEREO_FOCAL_BASELINE / np.where(valid, z, DEPTH_MAX_M)
    disparity = disparity + DISPARITY_NOISE_PX * rng.standard_normal(size)
    measured = STEREO_FOCAL_BASELINE / np.maximum(disparity, STEREO_FOCAL_BASELINE / 65.0)
    # Occlusion shadows: background the second camera cannot see, left of nearer surfaces.
    shift = STEREO_BASELINE_M * scene.camera.focal / z  # this image's disparity; 0 for the sky
    shadow = np.zeros(size, dtype=bool)
    for s in range(1, int(np.ceil(shift.max())) + 1):
        shadow[:, :-s] |= shift[:, s:] - shift[:, :-s] >= s
    scale = size[1] / REFERENCE_WIDTH
    holes = _smooth_noise(rng, size, 3.0 * scale) > rng.uniform(2.0, 2.8)
    holes |= rng.random(size) < DEPTH_DROPOUT
    valid &= ~shadow & ~holes & (measured <= DEPTH_MAX_M)
    return np.where(valid, np.round(measured * 1000), DEPTH_INVALID).astype(np.uint16)


def render_scene(rng: np.random.Generator, image_size: tuple[int, int], condition: str,
                 sensors: tuple[str, ...] = SENSORS) -> dict[str, np.ndarray]:
    """One random scene under `condition` ("day", "dusk" or "night"), seen by `sensors`.

    Returns rgb (HxWx3 uint8), thermal (HxW uint16 centikelvin), depth (HxW uint16 mm, 0 =
    invalid) for the sensors asked for, and always label (HxW uint8 train ids) and
    camouflaged (HxW bool: object parts coloured like their background; for tests). Each
    sensor draws its noise from its own stream, so leaving one out changes no other.
    """
    if condition not in LIGHTING:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    unknown = set(sensors) - set(SENSORS)
    if unknown:
        raise ValueError(f"unknown sensors {sorted(unknown)}; choose from {SENSORS}")
    light = LIGHTING[condition]
    scene = _sample_scene(rng, image_size, light)
    surf = _trace(scene, image_size, light)
    cameras = {"rgb": _rgb_camera, "thermal": _thermal_camera, "depth": _depth_sensor}
    out = {}
    for sensor, sensor_rng in zip(SENSORS, rng.spawn(len(SENSORS))):
        if sensor in sensors:
            out[sensor] = cameras[sensor](surf, scene, light, sensor_rng)
    return out | {"label": surf.label, "camouflaged": surf.camouflaged,
                  **instance_boxes(surf.instance, [o.label for o in scene.objects])}


def instance_boxes(instance: np.ndarray, labels: list[int]) -> dict[str, np.ndarray]:
    """Detection boxes of the objects seen in an instance map: the extents of each object's
    visible pixels (COCO's visible box), half-open xyxy, class ids into `BOX_CLASS_NAMES`.
    Objects with fewer than `MIN_BOX_PIXELS` visible pixels (scaled with the width) get no box:
    a speck of a few pixels cannot be told from noise."""
    min_pixels = MIN_BOX_PIXELS * (instance.shape[1] / REFERENCE_WIDTH) ** 2
    boxes, classes = [], []
    for index, found in enumerate(ndimage.find_objects(instance), start=1):
        if found is None or np.count_nonzero(instance[found] == index) < min_pixels:
            continue
        rows, cols = found
        boxes.append([cols.start, rows.start, cols.stop, rows.stop])
        classes.append(BOX_CLASSES.index(labels[index - 1]))
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4), "box_labels": np.asarray(classes, np.int64)}


def yolo_text(boxes: np.ndarray, classes: np.ndarray, size: tuple[int, int]) -> str:
    """Boxes as YOLO text (`class cx cy w h`, normalised), the demo's box-label files."""
    height, width = size
    lines = []
    for (x1, y1, x2, y2), cls in zip(boxes.tolist(), classes.tolist(), strict=True):
        lines.append(f"{cls} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                     f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return "".join(f"{line}\n" for line in lines)


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FoundationCorpus:
    """The RGB-only pretraining corpus of the demo foundation model (config `demo.foundation`).

    Its scenes come from `seed` and streams of their own, so they are disjoint from every task
    split and pool; `conditions` are the probabilities of day, dusk and night (web photographs
    are mostly taken by day).
    """

    seed: int = 1
    num_train: int = 0
    num_val: int = 0
    conditions: tuple[tuple[str, float], ...] = (("day", 0.7), ("dusk", 0.2), ("night", 0.1))

    @classmethod
    def from_config(cls, config: FoundationCorpus | dict | None) -> FoundationCorpus:
        if isinstance(config, FoundationCorpus):
            return config
        config = dict(config or {})
        if "conditions" in config:
            config["conditions"] = tuple(dict(config["conditions"]).items())
        corpus = cls(**config)
        names, weights = zip(*corpus.conditions) if corpus.conditions else ((), ())
        if set(names) - set(CONDITIONS) or min(weights, default=0) < 0 or not math.isclose(sum(weights), 1.0):
            raise ValueError(f"demo.foundation.conditions must give probabilities of {CONDITIONS} summing "
                             f"to 1, got {dict(corpus.conditions)}")
        return corpus

    def condition(self, rng: np.random.Generator) -> str:
        names, weights = zip(*self.conditions)
        return str(rng.choice(names, p=np.array(weights) / sum(weights)))


def generate_demo(
    root: Path,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (128, 128),
    num_train: int = 96,
    num_val: int = 24,
    num_test: int = 48,
    num_pool: int = 160,
    foundation: FoundationCorpus | dict | None = None,
    progress: bool = True,
) -> dict:
    """Write the demo dataset to `root` (replacing it) and return what `classes.json` says.

    Layout: `paired/{train,val,test}/{rgb,thermal,depth,label}/<name>.png` and
    `paired/<split>/boxes/<name>.txt` (YOLO text boxes of the objects, `instance_boxes`), unlabeled pools
    `pool/thermal/<name>.png`, `pool/depth/<name>.png` (num_pool each, from scenes of their
    own), and the foundation corpus `foundation/{train,val}/{rgb,label}/<name>.png`, where
    `<name>` is `<condition>_<index:05d>`; conditions cycle day, dusk, night, except in the
    foundation corpus, where each scene draws one from `foundation.conditions`.
    The tree is built next to `root` and renamed into place, so a failed run leaves no
    half-written dataset. Same arguments give byte-identical files.
    """
    height, width = image_size
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ValueError(f"image_size must be positive multiples of 32 (H, W), got {image_size}")
    corpus = FoundationCorpus.from_config(foundation)
    counts = {"train": num_train, "val": num_val, "test": num_test,
              "pool_thermal": num_pool, "pool_depth": num_pool,
              "foundation_train": corpus.num_train, "foundation_val": corpus.num_val}
    if min(counts.values()) < 0:
        raise ValueError(f"scene counts must not be negative, got {counts}")

    def cycle(rng: np.random.Generator, index: int) -> str:
        return CONDITIONS[index % len(CONDITIONS)]

    def drawn(rng: np.random.Generator, index: int) -> str:
        return corpus.condition(rng)

    # (stream, seed, condition of a scene, folder under root, modalities written) per part.
    parts = [(split, seed, cycle, Path("paired", split), ("rgb", "thermal", "depth", "label", BOXES_DIR))
             for split in SPLITS]
    parts += [("pool_thermal", seed, cycle, Path("pool"), ("thermal",)),
              ("pool_depth", seed, cycle, Path("pool"), ("depth",))]
    parts += [(f"foundation_{split}", corpus.seed, drawn, Path("foundation", split), ("rgb", "label"))
              for split in ("train", "val") if counts[f"foundation_{split}"]]
    info = {
        "class_names": list(CLASS_NAMES),
        "palette": [list(colour) for colour in PALETTE],
        "box_class_names": list(BOX_CLASS_NAMES),
        "ignore_index": IGNORE_INDEX,
        "thermal_units": THERMAL_UNITS,
        "depth_units": DEPTH_UNITS,
        "depth_invalid": DEPTH_INVALID,
        "conditions": list(CONDITIONS),
        "seed": seed,
        "foundation_seed": corpus.seed,
        "foundation_conditions": dict(corpus.conditions),
        "image_size": [height, width],
        "counts": counts,
    }

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        with tqdm(total=sum(counts.values()), desc="demo scenes", unit="scene",
                  disable=not progress) as bar:
            for stream, part_seed, condition_of, folder, modalities in parts:
                for modality in modalities:
                    (staging / folder / modality).mkdir(parents=True)
                for index in range(counts[stream]):
                    rng = np.random.default_rng([part_seed, STREAM_IDS[stream], index])
                    condition = condition_of(rng, index)
                    sensors = tuple(m for m in modalities if m in SENSORS)
                    arrays = render_scene(rng, (height, width), condition, sensors)
                    for modality in modalities:
                        name = staging / folder / modality / f"{condition}_{index:05d}"
                        if modality == BOXES_DIR:
                            name.with_suffix(".txt").write_text(
                                yolo_text(arrays["boxes"], arrays["box_labels"], (height, width)))
                        else:
                            name.with_suffix(".png").write_bytes(encode_png(arrays[modality]))
                    bar.update()
        (staging / "classes.json").write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        _replace_dir(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an existing directory there.

    A directory cannot be renamed over a non-empty one, so the old one is first renamed
    aside, and put back if the second rename fails.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = new.with_name(new.name + "-old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)
