"""The Shapes testbed: procedural images of colored, textured shapes with captions and exact labels.

Every record is a pure function of `(seed, split, index)` (numpy Philox seeded through a
`SeedSequence`; the global RNG is never touched), so any example can be regenerated anywhere, by any
host, in any order.

An image (default 64×64 RGB uint8, any `image_size` ≥ 16) shows 1–3 non-overlapping objects on a grey
background. Each object has a color (`COLORS`), shape (`SHAPES`), texture (`TEXTURES`), size (`SIZES`)
and position. Objects are rasterised at `supersample`× resolution and box-filtered down, so edges are
anti-aliased. The caption comes from a small grammar that covers the T2I-CompBench categories
(`CATEGORIES`):

    color     "a red circle and a blue square"                 2 objects, distinct colors
    shape     "a large star and a small heart"                 2 objects, distinct shapes (+ size)
    texture   "a striped circle and a dotted triangle"         2 objects, distinct textures
    spatial   "a green triangle to the left of a yellow star"  2 objects, relation from `RELATIONS`
    counting  "two red circles" / "two red circles and one blue square"   1–3 objects
    complex   "a large red striped circle above a blue dotted square, and a pink plain star"
              3 objects, color + texture + shape (+ sometimes size), relation with probability 1/2

Attributes a caption does not mention are random (color, size) or plain (texture).

Label layout (one record = one dict; object slots are padded to `MAX_OBJECTS` = 3 and are in the
ORDER THE CAPTION MENTIONS THE OBJECTS; identical objects of one count group are ordered left to right):

    caption           str
    category          int32 ()          index into CATEGORIES
    num_objects       int32 ()          1..3
    object_present    bool  (3,)        slot holds an object
    object_color      int32 (3,)        index into COLORS,   -1 for an empty slot
    object_shape      int32 (3,)        index into SHAPES,   -1 for an empty slot
    object_texture    int32 (3,)        index into TEXTURES, -1 for an empty slot
    object_size       int32 (3,)        index into SIZES,    -1 for an empty slot
    object_xy         float32 (3, 2)    (x, y) of the object's area centroid in [0, 1], x to the
                                        right, y DOWN (image coordinates); 0 for an empty slot
    object_mentioned  bool  (3, 4)      whether the caption names the object's attribute, columns
                                        in ATTRIBUTES order (color, shape, texture, size)
    relation          int32 ()          index into RELATIONS: "slot 0 <relation> slot 1"; -1 if none
    background        int32 ()          index into BACKGROUNDS
    index             int64 ()          the record's index within its split
    render_seed       int64 ()          seeds the background noise / gradient (records only;
                                        `make_example` drops it and adds `image`)

`make_example` adds `image: uint8 (H, W, 3)`.

Splits: "train", "eval" and "heldout". The (color, shape) pairs in `HELDOUT_PAIRS` (7 of 48, ≈15 %)
never appear in "train" or "eval" records; every "heldout" record contains at least one of them (all
other objects use training pairs).

CLI: `python -m flash_jax.data.shapes --out grid.png --n 16` writes a captioned grid of examples.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOR_RGB = np.array(
    [
        (220, 40, 40),
        (245, 140, 30),
        (240, 215, 40),
        (40, 170, 70),
        (40, 200, 210),
        (40, 80, 220),
        (140, 60, 200),
        (240, 120, 190),
    ],
    np.uint8,
)
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
SHAPE_PLURALS = ("circles", "squares", "triangles", "stars", "crosses", "hearts")
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
# Radius of each size's bounding circle, as a fraction of the image side.
SIZE_RADIUS = (0.12, 0.19)
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = ("to the left of", "to the right of", "above", "below")
CATEGORIES = ("color", "shape", "texture", "spatial", "counting", "complex")
ATTRIBUTES = ("color", "shape", "texture", "size")
BACKGROUNDS = (
    "light",
    "dark",
    "light gradient",
    "dark gradient",
    "light noise",
    "dark noise",
)
NUMBERS = ("zero", "one", "two", "three")
SPLITS = ("train", "eval", "heldout")
MAX_OBJECTS = 3

HELDOUT_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (COLORS.index(c), SHAPES.index(s))
    for c, s in (
        ("red", "star"),
        ("orange", "square"),
        ("yellow", "heart"),
        ("green", "circle"),
        ("cyan", "cross"),
        ("blue", "triangle"),
        ("purple", "heart"),
    )
)
TRAIN_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (c, s)
    for c in range(len(COLORS))
    for s in range(len(SHAPES))
    if (c, s) not in set(HELDOUT_PAIRS)
)

_PAD = 0.02  # min distance from an object's bounding circle to the image border
_GAP = 0.03  # min gap between two objects' bounding circles
_PLACE_TRIES = 200
_SPEC_TRIES = 100
_SHADE = 0.42  # texture pattern on light backgrounds: _SHADE * object color
_TINT = 0.6  # texture pattern on dark backgrounds: object color mixed _TINT of the way to white


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    ss = np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)])
    return np.random.Generator(np.random.Philox(ss))


# ------------------------------------------------------------------------------ object specs


def _obj(pair, texture=0, size=0, mentioned=(True, True, False, False)):
    return {"color": pair[0], "shape": pair[1], "texture": texture, "size": size, "m": mentioned}


def _specs(rng: np.random.Generator, category: str, heldout: bool):
    """Samples the objects (in caption order) and relation of one record, without positions.

    Returns `(objects, relation, groups)`; `groups` lists the slot indices of each counting group.
    """
    n_groups = {"color": 2, "shape": 2, "texture": 2, "spatial": 2, "complex": 3}.get(category)
    count_mode = None
    if category == "counting":
        count_mode = int(rng.integers(4))  # 0..2: one group of 1..3; 3: two groups
        n_groups = 1 if count_mode < 3 else 2
    held_group = int(rng.integers(n_groups)) if heldout else -1

    def pairs():
        out = []
        for g in range(n_groups):
            pool = HELDOUT_PAIRS if g == held_group else TRAIN_PAIRS
            out.append(pool[int(rng.integers(len(pool)))])
        return out

    def sizes(n):
        return [int(s) for s in rng.integers(len(SIZES), size=n)]

    relation = -1
    groups = None
    for _ in range(_SPEC_TRIES):
        ps = pairs()
        if category == "color":
            sz = sizes(2)
            objs = [_obj(p, 0, s) for p, s in zip(ps, sz, strict=True)]
            ok = ps[0][0] != ps[1][0]
        elif category == "shape":
            sz = sizes(2)
            m = (False, True, False, True)
            objs = [_obj(p, 0, s, m) for p, s in zip(ps, sz, strict=True)]
            ok = ps[0][1] != ps[1][1]
        elif category == "texture":
            tx = [int(t) for t in rng.integers(len(TEXTURES), size=2)]
            sz = sizes(2)
            m = (False, True, True, False)
            objs = [_obj(p, t, s, m) for p, t, s in zip(ps, tx, sz, strict=True)]
            ok = tx[0] != tx[1]
        elif category == "spatial":
            sz = sizes(2)
            objs = [_obj(p, 0, s) for p, s in zip(ps, sz, strict=True)]
            relation = int(rng.integers(len(RELATIONS)))
            ok = ps[0] != ps[1]
        elif category == "complex":
            tx = [int(t) for t in rng.integers(len(TEXTURES), size=3)]
            sz = sizes(3)
            say_size = rng.random(3) < 0.25
            objs = [
                _obj(p, t, s, (True, True, True, bool(m)))
                for p, t, s, m in zip(ps, tx, sz, say_size, strict=True)
            ]
            relation = int(rng.integers(len(RELATIONS))) if rng.random() < 0.5 else -1
            keys = [(o["color"], o["shape"], o["texture"]) for o in objs]
            ok = len(set(keys)) == 3
        elif category == "counting":
            counts = (
                [count_mode + 1]
                if count_mode < 3
                else [(1, 1), (2, 1), (1, 2)][int(rng.integers(3))]
            )
            objs, groups = [], []
            for p, c in zip(ps, counts, strict=True):
                groups.append(list(range(len(objs), len(objs) + c)))
                objs += [_obj(p, 0, s) for s in sizes(c)]
            ok = len(ps) == 1 or ps[0] != ps[1]
        else:
            raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
        if ok:
            return objs, relation, groups
    raise RuntimeError(f"could not sample a {category} record in {_SPEC_TRIES} tries")


# ------------------------------------------------------------------------------ placement


def _relation_holds(xy0, xy1, r0, r1, relation: int) -> bool:
    """True iff `xy0 <relation> xy1` clearly: separated along the axis, mostly aligned with it."""
    dx, dy = xy1[0] - xy0[0], xy1[1] - xy0[1]
    if relation in (1, 3):  # right of / below: mirror
        dx, dy = -dx, -dy
    main, other = (dx, dy) if relation in (0, 1) else (dy, dx)
    return main >= r0 + r1 and abs(other) <= 0.5 * main


def _try_place(rng, radii, relation):
    n = len(radii)
    for _ in range(_PLACE_TRIES):
        xy = np.array([rng.uniform(r + _PAD, 1.0 - r - _PAD, size=2) for r in radii])
        ok = all(
            np.hypot(*(xy[i] - xy[j])) >= radii[i] + radii[j] + _GAP
            for i in range(n)
            for j in range(i + 1, n)
        )
        if ok and relation >= 0:
            ok = _relation_holds(xy[0], xy[1], radii[0], radii[1], relation)
        if ok:
            return xy
    return None


def _canonical_place(n: int, relation: int) -> np.ndarray:
    # Valid for small objects; used only if random placement of all-small objects failed.
    xy = np.array([(0.25, 0.5), (0.75, 0.5), (0.5, 0.15)][:n])
    if relation in (2, 3):
        xy = xy[:, ::-1].copy()
    if relation in (1, 3):
        xy[:2] = xy[1::-1].copy()
    return xy


def _place(rng, objs, relation):
    """Positions (n, 2); if random placement fails, shrinks large objects (last first) and retries."""
    while True:
        xy = _try_place(rng, [SIZE_RADIUS[o["size"]] for o in objs], relation)
        if xy is not None:
            return xy
        large = [o for o in objs if o["size"] > 0]
        if not large:
            return _canonical_place(len(objs), relation)
        large[-1]["size"] = 0


# ------------------------------------------------------------------------------ captions


def _phrase(o, count: int = 1, number: bool = False) -> str:
    """ "a large red striped circle" / "two red circles" (adjectives in size-color-texture order)."""
    m = o["m"]
    words = []
    if m[3]:
        words.append(SIZES[o["size"]])
    if m[0]:
        words.append(COLORS[o["color"]])
    if m[2]:
        words.append(TEXTURES[o["texture"]])
    words.append(SHAPES[o["shape"]] if count == 1 else SHAPE_PLURALS[o["shape"]])
    det = NUMBERS[count] if number else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([det, *words])


def _caption(category: str, objs, relation: int, groups) -> str:
    if category == "counting":
        return " and ".join(_phrase(objs[g[0]], len(g), number=True) for g in groups)
    ph = [_phrase(o) for o in objs]
    if relation >= 0:
        head = f"{ph[0]} {RELATION_PHRASES[relation]} {ph[1]}"
        return head if len(ph) == 2 else f"{head}, and {ph[2]}"
    if len(ph) == 3:
        return f"{ph[0]}, {ph[1]} and {ph[2]}"
    return " and ".join(ph)


# ------------------------------------------------------------------------------ records


def sample_record(seed: int, split: str, index: int, category: str | None = None) -> dict[str, Any]:
    """The record `(seed, split, index)`: caption and labels (layout in the module docstring).

    `category` forces a category (the record then differs from the default one at that index);
    by default the category is drawn uniformly. Deterministic; never touches global RNG state.
    """
    rng = _rng(seed, split, index)
    cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category is not None:
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
        cat = category
    objs, relation, groups = _specs(rng, cat, heldout=split == "heldout")
    xy = _place(rng, objs, relation)
    if groups is not None:  # identical objects of a count group: order left to right
        for g in groups:
            order = sorted(g, key=lambda i: xy[i][0])
            xy[g] = xy[order]
            sz = [objs[i]["size"] for i in order]
            for i, s in zip(g, sz, strict=True):
                objs[i]["size"] = s
    n = len(objs)
    pad = MAX_OBJECTS - n
    ints = lambda k: np.array([o[k] for o in objs] + [-1] * pad, np.int32)  # noqa: E731
    return {
        "caption": _caption(cat, objs, relation, groups),
        "category": np.int32(CATEGORIES.index(cat)),
        "num_objects": np.int32(n),
        "object_present": np.arange(MAX_OBJECTS) < n,
        "object_color": ints("color"),
        "object_shape": ints("shape"),
        "object_texture": ints("texture"),
        "object_size": ints("size"),
        "object_xy": np.concatenate([xy, np.zeros((pad, 2))]).astype(np.float32),
        "object_mentioned": np.array(
            [o["m"] for o in objs] + [(False,) * len(ATTRIBUTES)] * pad, bool
        ),
        "relation": np.int32(relation),
        "background": np.int32(rng.integers(len(BACKGROUNDS))),
        "index": np.int64(index),
        "render_seed": np.int64(rng.integers(2**62)),
    }


# ------------------------------------------------------------------------------ rendering


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (k, 2) of a shape inside the unit circle, area centroid at the origin, y down."""
    t = lambda k, start: start + 2 * np.pi * np.arange(k) / k  # noqa: E731
    if shape == "square":
        h = 0.72
        p = np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif shape == "triangle":
        a = t(3, -np.pi / 2)
        p = np.stack([np.cos(a), np.sin(a)], 1) * 1.05
        p[:, 1] += 0.2  # equilateral triangles look high in their circle; use the space
    elif shape == "star":
        a = t(10, -np.pi / 2)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        p = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "cross":
        w, length = 0.3, 0.92
        p = np.array(
            [
                (-w, -length),
                (w, -length),
                (w, -w),
                (length, -w),
                (length, w),
                (w, w),
                (w, length),
                (-w, length),
                (-w, w),
                (-length, w),
                (-length, -w),
                (-w, -w),
            ]
        )
    elif shape == "heart":
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(a) ** 3
        y = -(13 * np.cos(a) - 5 * np.cos(2 * a) - 2 * np.cos(3 * a) - np.cos(4 * a))
        p = np.stack([x, y], 1)
    else:
        raise ValueError(shape)
    # Shift the area centroid to the origin, then scale to fit the unit circle.
    x, y = p[:, 0], p[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    c = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)
    p = p - c
    return p / max(1.0, np.hypot(p[:, 0], p[:, 1]).max())


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


def _shape_mask(shape: int, cx: float, cy: float, r: float, wh: tuple[int, int]) -> np.ndarray:
    """Binary mask (h, w) float32 of one shape on a (w, h) canvas; cx, cy, r in its pixels."""
    im = Image.new("L", wh, 0)
    draw = ImageDraw.Draw(im)
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        pts = _POLYGONS[name] * r + (cx, cy)
        draw.polygon([tuple(q) for q in pts], fill=255)
    return np.asarray(im, np.float32) / 255.0


def _pattern(texture: int, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """1 where the texture shows its shade; u, v are offsets from the object center in pixels."""
    name = TEXTURES[texture]
    if name == "plain":
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), np.float32)
    if name == "striped":
        period = max(3.0, 0.09 * size)
        return (np.mod((u + v) / (period * math.sqrt(2)), 1.0) < 0.5).astype(np.float32)
    if name == "dotted":
        period = max(4.0, 0.1 * size)
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return (du**2 + dv**2 <= (0.3 * period) ** 2).astype(np.float32)
    if name == "checkered":
        cell = max(2.0, 0.07 * size)
        return (np.mod(np.floor(u / cell) + np.floor(v / cell), 2) == 1).astype(np.float32)
    raise ValueError(name)


def _background(record, size: int) -> np.ndarray:
    kind = BACKGROUNDS[int(record["background"])]
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(int(record["render_seed"]))))
    base = 225.0 if kind.startswith("light") else 45.0
    bg = np.full((size, size), base, np.float32)
    if kind.endswith("gradient"):
        angle = rng.uniform(0, 2 * np.pi)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
        bg = bg + 40.0 * ramp / 0.7071
    elif kind.endswith("noise"):
        bg = bg + rng.normal(0, 6.0, size=(size, size)).astype(np.float32)
    return np.repeat(np.clip(bg, 0, 255)[..., None], 3, axis=-1)


def _pattern_rgb(rgb: np.ndarray, background: int) -> np.ndarray:
    # Patterns contrast with the object AND the background: darker on light, lighter on dark.
    if BACKGROUNDS[background].startswith("light"):
        return rgb * _SHADE
    return rgb + _TINT * (255.0 - rgb)


def _box_down(a: np.ndarray, ss: int) -> np.ndarray:
    """Box-filters the leading two (spatial) axes of `a` by a factor `ss`."""
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean((1, 3))


def render_with_masks(
    record: dict[str, Any], image_size: int = 64, supersample: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Renders a record. Returns `(image uint8 (H, W, 3), masks float32 (MAX_OBJECTS, H, W))`.

    `masks[i]` is slot i's visible coverage in [0, 1] (anti-aliased; all zeros for an empty slot).
    Each object is rasterised at `supersample`x resolution inside its bounding box and box-filtered
    down (exact for non-overlapping objects, since the background is constant within an output pixel).
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    s, ss = image_size, supersample
    image = _background(record, s)
    masks = np.zeros((MAX_OBJECTS, s, s), np.float32)
    for i in range(int(record["num_objects"])):
        x, y = (float(c) * s for c in record["object_xy"][i])
        r = SIZE_RADIUS[int(record["object_size"][i])] * s
        x0, y0 = max(0, math.floor(x - r) - 1), max(0, math.floor(y - r) - 1)
        x1, y1 = min(s, math.ceil(x + r) + 2), min(s, math.ceil(y + r) + 2)
        w, h = x1 - x0, y1 - y0
        mask = _shape_mask(
            int(record["object_shape"][i]), (x - x0) * ss, (y - y0) * ss, r * ss, (w * ss, h * ss)
        )
        u = (np.arange(w * ss, dtype=np.float32) + 0.5) / ss + x0 - x
        v = (np.arange(h * ss, dtype=np.float32) + 0.5) / ss + y0 - y
        shade = _pattern(int(record["object_texture"][i]), u[None, :], v[:, None], s)[..., None]
        rgb = COLOR_RGB[int(record["object_color"][i])].astype(np.float32)
        fill = rgb + shade * (_pattern_rgb(rgb, int(record["background"])) - rgb)
        m = _box_down(mask, ss)
        region = (slice(y0, y1), slice(x0, x1))
        image[region] = image[region] * (1.0 - m[..., None]) + _box_down(fill * mask[..., None], ss)
        masks[(slice(None), *region)] *= 1.0 - m
        masks[(i, *region)] = m
    return np.clip(np.round(image), 0, 255).astype(np.uint8), masks


def render(record: dict[str, Any], image_size: int = 64, supersample: int = 4) -> np.ndarray:
    """Renders a record to a uint8 image (image_size, image_size, 3)."""
    return render_with_masks(record, image_size, supersample)[0]


def make_example(
    seed: int, split: str, index: int, image_size: int = 64, category: str | None = None
) -> dict[str, Any]:
    """One training example: the record's labels (module docstring) plus `image` uint8 (H, W, 3)."""
    record = sample_record(seed, split, index, category)
    example = {k: v for k, v in record.items() if k != "render_seed"}
    example["image"] = render(record, image_size)
    return example


# ------------------------------------------------------------------------------ CLI


def grid_image(
    examples: Sequence[dict[str, Any]], cols: int = 4, scale: int = 3, text_lines: int = 3
) -> Image.Image:
    """A PIL grid of examples, each upscaled `scale`× with its caption underneath."""
    h, w = examples[0]["image"].shape[:2]
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=max(10, cw // 18))
    line_h = int(font.size * 1.25)
    cell_h = ch + line_h * text_lines + 6
    rows = math.ceil(len(examples) / cols)
    sheet = Image.new("RGB", (cols * (cw + 8) + 8, rows * (cell_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for k, ex in enumerate(examples):
        x0, y0 = 8 + (k % cols) * (cw + 8), 8 + (k // cols) * (cell_h + 8)
        img = Image.fromarray(np.asarray(ex["image"])).resize((cw, ch), Image.NEAREST)
        sheet.paste(img, (x0, y0))
        caption = ex["caption"]
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        lines, line = [], ""
        for word in caption.split():
            cand = f"{line} {word}".strip()
            if draw.textlength(cand, font=font) > cw and line:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
        for j, text in enumerate(lines[:text_lines]):
            draw.text((x0, y0 + ch + 3 + j * line_h), text, fill="black", font=font)
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a captioned grid of Shapes examples.")
    parser.add_argument("--out", default="shapes_grid.png", help="output PNG path")
    parser.add_argument("--n", type=int, default=16, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--start", type=int, default=0, help="first record index")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--category", default=None, choices=CATEGORIES)
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--scale", type=int, default=3, help="upscaling of each image")
    args = parser.parse_args(argv)
    examples = [
        make_example(args.seed, args.split, i, args.image_size, args.category)
        for i in range(args.start, args.start + args.n)
    ]
    grid_image(examples, cols=args.cols, scale=args.scale).save(args.out)
    print(f"wrote {args.n} {args.split} examples to {args.out}")


if __name__ == "__main__":
    main()
