"""Toy text-to-image world: a 32x32 scene generator and three pixel-reading rewards that mirror the
paper's three tasks (section 10): GenEval composition, OCR text rendering and aesthetics.

A tiny SD3.5-style model is pretrained on `sample_batch` renders (toy/pretrain.py), one teacher per
task is trained with `geneval_reward`, `ocr_reward`, `aesthetic_reward` (registered as toy_geneval,
toy_ocr, toy_aesthetic), and the student is distilled from them. Every reward reads pixels only.

World: 6 palette colours (PALETTE, GenEval colour names) and 3 filled shapes (circle, square,
triangle with its apex up) on a black background; text in a hand-made 5x7 font of 10 digits and
10 letters (FONT). Prompt files in data/toy/<task>/ (`write_datasets`; read with data.load_prompts),
each task's templates unmistakably its own:
  geneval   "a photo of two circles", "a photo of a circle left of a square", with GenEval metadata
            {"tag", "include": [{"class", "count", "color"?, "position"?}], "exclude"?, "prompt"},
            for the six tags of GenEval.
  ocr       'a sign that says "A3"'; metadata {"prompt", "text", "color"?}.
  aesthetic "a beautiful blue triangle" (never "a photo of"); metadata {"prompt", "color", "shape"}.

Headroom: every task has the same structure. The base reliably learns the content skill, and the
headroom is a removable, prompt-independent defect drawn in DEFECT_RATE of the pretraining renders
(`render`), which only that task's reward penalises (docs/toy-world.md, "World v2"):
  geneval   layouts are a function of the prompt (the first-named object on the left or where the
            relation puts it, n objects of a count in fixed slots, one object in the centre box).
            Defect: every object cracked by a CRACK-px vertical gap; the detector accepts neither
            half, so GenEval's strict rule fails.
  ocr       two glyphs at one central place; each glyph has a slot-bound T5 token (T5_PIECES: '"A'
            is "A in the first slot", 'A"' is "A in the second slot"), so a test string is a new
            pair of seen tokens. Defect: a 4x4 blot of the text's ink in the top-left corner (BLOT);
            the glyphs are intact, but the reader's crop is the ink's extent, so it reads other glyphs.
  aesthetic the crisp 16-px centred object of GenEval's single object, judged by a preference for
            one large, centred, clean, contrasting object times a strict prompt term (a wrong shape
            or colour scores 0, so no teacher can trade shape for size). Defect: an amateur picture,
            a 12-px object in a corner slot on a grey ramp. `render_ideal_aesthetic` draws what the
            judge likes most (~1.0) and only tests the judge.
The rewards disagree about layout (the judge scores at most 1/2 when there are two equal objects,
its favourite, one big centred object, fails GenEval's multi-object prompts), but the tasks do not
conflict in training: each prompt is its own task's, each reward wants only the absence of its own
defect, and no teacher's change can cost another task. Measured at matched CFG, every cross-task
effect of this world's teachers is >= 0 (docs/toy-world.md, "The third design"); toy/framed.py is
the candidate world whose tasks do conflict.

Splits: every T5 token of every test prompt occurs in a training prompt (tests/algorithm/test_toy.py).
GenEval's small tags (fewer than SMALL_TAG prompts: single object, two objects, counting, colours,
position) are held out by seed, as GenEval samples 4 images a prompt: their test lines are training
prompts evaluated from unseen noise; colour attribution holds out 32 prompts. OCR holds out 80 of
the 400 strings, aesthetic 60 of its 216 prompts. Pretraining never sees a held-out prompt.

Departures from the paper's tasks (section 10), each because the toy world has no real detector,
reader or preference model, or a CPU-sized model:
 1. Detector: pixels go to the nearest of {background, palette colours} (background = median colour
    of the image border); each 4-connected region of one colour of >= MIN_AREA pixels is classed as
    the ideal circle/square/triangle (drawn in the region's box) of highest IoU with its mask, with
    confidence IoU x box aspect ratio (shapes are drawn in square boxes; GenEval: Mask2Former's
    score); regions under MIN_CONFIDENCE are dropped. The region's colour is the object's colour
    (GenEval: CLIP zero-shot). One confidence threshold for all tags (GenEval: 0.9 for counting).
 2. The GenEval rules are rules.geneval_score (Flow-GRPO's partial credit as `scores`, GenEval's
    strict accuracy as info["strict"]), with the partial credit clamped at 0 (Flow-GRPO's can be
    negative).
 3. Counting prompts use counts 1-4 (GenEval: 2-4), so that a world of 3 classes has enough prompts.
 4. OCR: a template-matching reader for the toy font (`read_text`) instead of PaddleOCR; the reward
    rule is Flow-GRPO's (rules.ocr_score). The strings are exactly two glyphs of 10x14 px (font
    scale 2), always drawn at the same central place: a 4-layer model pretrained on CPU renders
    them legibly, while with 3-4 glyphs of 5x7 px anywhere in the frame it drew stroke soup
    (docs/toy-world.md). Flow-GRPO's OCR strings are longer and placed freely.
 5. Aesthetic: a hand-written preference (`aesthetic_terms`) times a strict prompt-alignment
    indicator, in place of the PickScore + CLIPScore + HPSv2.1 mix of the paper's aesthetic teacher.
 6. GenEval layouts are fixed slots chosen by the prompt, not free placement: with free positions
    and sizes the 4-layer model drew blobs the detector could not class. GenEval's relations only
    compare centres, so any layout that satisfies the relation counts.
 7. The headroom of every task is a defect planted in the pretraining renders (cracked shapes, a
    blot beside the text, an amateur picture), not a missing skill: on the real SD3.5-M the GenEval
    teacher learns counting and binding the base lacks. A planted defect makes each teacher's gain
    large, reliable across seeds and independent of the prompt, which a CPU-sized model does not
    get from learning a skill. The OCR blot spoils the reading only because the template reader
    crops the ink's extent; a real OCR model would often read past it. The defects are drawn
    independently per render, and the base draws them nearly independently too (at one seed the
    tasks' defect flags correlate at +0.12, +0.11, -0.05 over 60 prompts, SE ~0.13).

Run (CPU, seconds):
  python -m toy.world --write-datasets        # regenerate data/toy/<task>/ (prompts, metadata, task.json)
  python -m study.mixed --tasks data/toy/geneval data/toy/ocr data/toy/aesthetic --out data/toy/mixed
  python -m toy.world --grid toy_grid.png    # pretraining renders of each task, without and with its defect
  python -m toy.world --colour-check models/toy-sd3   # which colour the base draws per colour word
  python -m pytest tests/algorithm/test_toy.py -q
"""
import argparse
import copy
import itertools
import re
import textwrap
from pathlib import Path

import numpy as np
import torch

from data import load_prompts, write_prompt_set
from rewards import REWARDS, register
from rewards.rules import COLORS as GENEVAL_COLORS, GENEVAL_TAGS, RELATIONS, geneval_score, ocr_score, quoted_target

IMAGE_SIZE = 32
TASKS = ("geneval", "ocr", "aesthetic")
DATA = "data/toy"      # the tasks' prompt folders, data/toy/<task> (inside the repository)
BACKGROUND = (0, 0, 0)
PALETTE = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 80, 235), "yellow": (240, 220, 30),
           "purple": (190, 40, 210), "white": (240, 240, 240)}  # GenEval colour names, far apart in RGB
COLORS = tuple(PALETTE)
assert set(COLORS) <= set(GENEVAL_COLORS), f"rules.geneval_score only knows the colours {GENEVAL_COLORS}"
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MIN_AREA = 10          # px; smaller same-colour regions are specks, not objects
MIN_CONFIDENCE = 0.5   # detection threshold on (IoU with the best ideal shape) x (box aspect ratio)
OCR_LENGTH = 2         # characters per OCR string: two 10x14-px glyphs (font scale 2) fill the 32-px frame
OCR_SCALE = 2
DEFECT_RATE = 0.5      # share of each task's pretraining renders drawn with its defect (docstring)
CRACK = 2              # px: the gap of a defective GenEval object
BLOT = (2, 2, 6, 6)    # OCR defect: a 4x4 blot of the text's colour in the top-left corner
SMALL_TAG = 64         # GenEval tags with fewer prompts than this are held out by seed, not by prompt
# GenEval slots (x0, y0, x1, y1), end exclusive: one object in the 16-px centre box, pairs side by
# side or one above the other in 12-px boxes 4 px apart, counts in fixed slots (departure 6)
CENTRE = (8, 8, 24, 24)
LEFT, RIGHT, TOP, BOTTOM = (2, 10, 14, 22), (18, 10, 30, 22), (10, 2, 22, 14), (10, 18, 22, 30)
GRID = ((2, 2, 14, 14), (18, 2, 30, 14), (2, 18, 14, 30), (18, 18, 30, 30))
COUNT_SLOTS = {1: (CENTRE,), 2: (LEFT, RIGHT), 3: (GRID[0], GRID[1], BOTTOM), 4: GRID}
# "A rel B" -> (A's box, B's box)
RELATION_SLOTS = {"left of": (LEFT, RIGHT), "right of": (RIGHT, LEFT), "above": (TOP, BOTTOM),
                  "below": (BOTTOM, TOP)}

FONT_ROWS = {  # 5x7 glyphs; each touches columns 0 and 4 and rows 0 and 6, so ink extent = cell grid
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. #####",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#", "C": ".###. #...# #.... #.... #.... #...# .###.",
    "E": "##### #.... #.... ####. #.... #.... #####", "H": "#...# #...# #...# ##### #...# #...# #...#",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "L": "#.... #.... #.... #.... #.... #.... #####",
    "P": "####. #...# #...# ####. #.... #.... #....", "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.", "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
}
FONT = {c: np.array([[ch == "#" for ch in row] for row in rows.split()]) for c, rows in FONT_ROWS.items()}
CHARSET = "".join(FONT)
OCR_TEMPLATES = ('a sign that says "{t}"', 'a poster with the text "{t}"', 'a label reading "{t}"',
                 'a license plate that says "{t}"', 'the code "{t}" on a screen', 'the text "{t}" in {c} letters',
                 'a {c} neon sign that reads "{t}"')
AESTHETIC_TEMPLATES = tuple(t.replace("CS", "{c} {s}") for t in (
    "a beautiful CS", "an elegant CS", "a simple CS, minimalist", "a CS, high quality",
    "a CS, award winning", "a CS, clean design", "a stunning CS", "a lovely CS", "a CS icon",
    "a CS logo", "an artwork of a CS", "a CS, 4k wallpaper"))
# slot-bound T5 pieces of the OCR text: '"A' (after a space: the first glyph) and 'A"' (the second)
T5_PIECES = tuple("\u2581\"" + c for c in CHARSET) + tuple(c + "\"" for c in CHARSET)


# ---------------------------------------------------------------- drawing

def shape_mask(shape, width, height):
    """(height, width) bool mask of a filled shape inscribed in a width x height box.

    Pixel centres (u, v) in box units [0, 1]: circle (u-1/2)^2 + (v-1/2)^2 <= 1/4; triangle with its
    apex at the top centre |u - 1/2| <= v/2 + 1/(2 width) (half a pixel of slack keeps the apex row).
    """
    v, u = (np.mgrid[0:height, 0:width] + 0.5) / np.array([height, width])[:, None, None]
    if shape == "square":
        return np.ones((height, width), bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape != "triangle":
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.abs(u - 0.5) <= 0.5 * v + 0.5 / width


def draw_scene(objects, background=BACKGROUND):
    """uint8 (IMAGE_SIZE, IMAGE_SIZE, 3) image of objects [{"class", "color", "box": (x0, y0, x1, y1)}]."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = background
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        if not (0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE):
            raise ValueError(f"box {obj['box']} outside the image")
        image[y0:y1, x0:x1][shape_mask(obj["class"], x1 - x0, y1 - y0)] = PALETTE[obj["color"]]
    return image


def draw_text(image, text, color, x0, y0, scale):
    """Draws `text` in FONT at `scale` px per font pixel with its top-left at (x0, y0), in place."""
    for k, char in enumerate(text):
        glyph = np.kron(FONT[char], np.ones((scale, scale), bool))  # (7 scale, 5 scale)
        left = x0 + 6 * scale * k  # pitch: 5 glyph columns + 1 blank column
        image[y0:y0 + 7 * scale, left:left + 5 * scale][glyph] = PALETTE[color]
    return image


# ---------------------------------------------------------------- prompts and renders

def _phrase(shape, color=None):
    return f"a {color} {shape}" if color else f"a {shape}"


def geneval_space():
    """Every GenEval-style metadata of the toy world, {tag: [metadata, ...]} in a fixed order."""
    space = {tag: [] for tag in GENEVAL_TAGS}
    for s in SHAPES:
        space["single_object"].append({"tag": "single_object", "include": [{"class": s, "count": 1}],
                                       "prompt": f"a photo of {_phrase(s)}"})
        for n in NUMBER_WORDS:
            space["counting"].append({"tag": "counting", "include": [{"class": s, "count": n}],
                                      "exclude": [{"class": s, "count": n + 1}],
                                      "prompt": f"a photo of {NUMBER_WORDS[n]} {s}{'s' if n > 1 else ''}"})
        for c in COLORS:
            space["colors"].append({"tag": "colors", "include": [{"class": s, "count": 1, "color": c}],
                                    "prompt": f"a photo of {_phrase(s, c)}"})
    for a, b in itertools.permutations(SHAPES, 2):
        space["two_object"].append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                                    "prompt": f"a photo of {_phrase(a)} and {_phrase(b)}"})
        # position prompts name no colour, as GenEval's own ("a photo of a dog right of a teddy bear")
        for rel in RELATIONS:  # "A rel B": GenEval lists the target B first, A refers to it by index
            space["position"].append({"tag": "position", "include": [{"class": b, "count": 1},
                                                                     {"class": a, "count": 1, "position": [rel, 0]}],
                                      "prompt": f"a photo of {_phrase(a)} {rel} {_phrase(b)}"})
        for ca, cb in itertools.product(COLORS, COLORS):
            space["color_attr"].append({"tag": "color_attr", "include": [{"class": a, "count": 1, "color": ca},
                                                                         {"class": b, "count": 1, "color": cb}],
                                        "prompt": f"a photo of {_phrase(a, ca)} and {_phrase(b, cb)}"})
    return space


GENEVAL_SPACE = geneval_space()


def random_color(rng):
    return COLORS[rng.integers(len(COLORS))]


def _random_text(rng):
    return "".join(rng.choice(list(CHARSET), size=OCR_LENGTH))


def ocr_metadata(text, rng):
    """{"prompt", "text", "color" (only when the random template names the text colour)}."""
    template, color = OCR_TEMPLATES[rng.integers(len(OCR_TEMPLATES))], random_color(rng)
    meta = {"prompt": template.format(t=text, c=color), "text": text}
    return dict(meta, color=color) if "{c}" in template else meta


def sample_scene(task, rng):
    """(prompt, metadata) of a random scene of `task` (geneval: tag uniform, then prompt uniform)."""
    if task == "geneval":
        tag = GENEVAL_TAGS[rng.integers(len(GENEVAL_TAGS))]
        meta = copy.deepcopy(GENEVAL_SPACE[tag][rng.integers(len(GENEVAL_SPACE[tag]))])
    elif task == "ocr":
        meta = ocr_metadata(_random_text(rng), rng)
    else:
        if task != "aesthetic":
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        c, s = random_color(rng), SHAPES[rng.integers(len(SHAPES))]
        meta = {"prompt": AESTHETIC_TEMPLATES[rng.integers(len(AESTHETIC_TEMPLATES))].format(c=c, s=s),
                "color": c, "shape": s}
    return meta["prompt"], meta


def grey_ramp():
    """(IMAGE_SIZE, 1, 1) uint8 vertical ramp from dark to light grey, a background."""
    return np.linspace(30, 150, IMAGE_SIZE).astype(np.uint8)[:, None, None]


def crack(mask):
    """`mask` with a CRACK-px vertical gap through its middle: each half's box is at most half as
    wide as tall, so the detector (confidence = shape IoU x box aspect ratio < 0.5) accepts neither."""
    cracked = mask.copy()
    middle = mask.shape[1] // 2
    cracked[:, middle - CRACK // 2:middle - CRACK // 2 + CRACK] = False
    return cracked


def geneval_layout(metadata):
    """Boxes of the objects of `metadata`, in the order of its include clauses expanded by count."""
    include = metadata["include"]
    if metadata["tag"] == "position":  # include = [target B, mover A with position [rel, 0]]
        box_a, box_b = RELATION_SLOTS[include[1]["position"][0]]
        return [box_b, box_a]
    n = sum(clause["count"] for clause in include)
    if n not in COUNT_SLOTS:
        raise ValueError(f"{metadata['prompt']!r}: 1-{max(COUNT_SLOTS)} objects")
    return list(COUNT_SLOTS[n])


def ocr_scene(text, color):
    """uint8 (32, 32, 3) image of `text` (OCR_LENGTH glyphs of CHARSET) in `color` at OCR_SCALE px per
    font pixel, centred, on the black background."""
    if not (len(text) == OCR_LENGTH and set(text) <= set(CHARSET)):
        raise ValueError(f"text {text!r}: {OCR_LENGTH} chars of {CHARSET}")
    width, height = 6 * OCR_SCALE * len(text) - OCR_SCALE, 7 * OCR_SCALE  # 22 x 14 px
    x0, y0 = (IMAGE_SIZE - width) // 2, (IMAGE_SIZE - height) // 2
    return draw_text(draw_scene([]), text, color, x0, y0, OCR_SCALE)


def geneval_objects(metadata, rng):
    """[(shape, colour, box)] of a GenEval scene: its include clauses expanded by count, a random
    colour where a clause names none, in geneval_layout's boxes."""
    objects = [(clause["class"], clause.get("color") or random_color(rng))
               for clause in metadata["include"] for _ in range(clause["count"])]
    return [(shape, color, box) for (shape, color), box in zip(objects, geneval_layout(metadata))]


def render(task, metadata, rng, defect_rate=DEFECT_RATE):
    """uint8 (32, 32, 3) pretraining render of `metadata`, with the task's defect in `defect_rate`
    of the renders (module docstring)."""
    defective = rng.random() < defect_rate
    if task == "aesthetic":
        color, shape = metadata["color"], metadata["shape"]
        if not defective:  # the crisp 16-px object of GenEval's single object, centred, on black
            return draw_scene([{"class": shape, "color": color, "box": CENTRE}])
        # an amateur picture: a 12-px object in a corner slot, on a vertical grey ramp
        image = draw_scene([])
        image[:] = grey_ramp()
        x0, y0, x1, y1 = GRID[rng.integers(len(GRID))]
        image[y0:y1, x0:x1][shape_mask(shape, x1 - x0, y1 - y0)] = PALETTE[color]
        return image
    if task == "ocr":
        color = metadata.get("color") or random_color(rng)
        image = ocr_scene(metadata["text"], color)
        if defective:  # a blot of the text's ink in the corner: the glyphs themselves stay intact
            bx0, by0, bx1, by1 = BLOT
            image[by0:by1, bx0:bx1] = PALETTE[color]
        return image
    if task != "geneval":
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    image = draw_scene([])
    for shape, color, (x0, y0, x1, y1) in geneval_objects(metadata, rng):
        mask = shape_mask(shape, x1 - x0, y1 - y0)
        image[y0:y1, x0:x1][crack(mask) if defective else mask] = PALETTE[color]
    return image


def render_ideal_aesthetic(metadata, rng):
    """What the aesthetic judge likes: one 20-22 px object of the prompt's colour and shape, centred
    (+-1 px), on the flat black background."""
    size = int(rng.integers(20, 23))
    x0, y0 = (IMAGE_SIZE - size) // 2 + rng.integers(-1, 2, size=2)
    return draw_scene([{"class": metadata["shape"], "color": metadata["color"],
                        "box": (int(x0), int(y0), int(x0) + size, int(y0) + size)}])


def sample_batch(n, rng, tasks=TASKS, exclude_prompts=frozenset(), defect_rate=DEFECT_RATE):
    """Pretraining batch: (images (n, 3, 32, 32) float in [0, 1], prompts, metadatas), tasks uniform
    from `tasks`, never a prompt in `exclude_prompts` (pass the held-out prompts), each task's defect
    in `defect_rate` of the renders."""
    return draw_batch(n, rng, tasks, exclude_prompts, lambda task, meta: render(task, meta, rng, defect_rate))


def draw_batch(n, rng, tasks, exclude_prompts, draw):
    """(images (n, 3, 32, 32) float in [0, 1], prompts, metadatas): tasks uniform from `tasks`, a
    scene of the task (sample_scene) not in `exclude_prompts`, drawn by draw(task, metadata) -> uint8
    (32, 32, 3); a world's sample_batch with its own way of drawing."""
    images, prompts, metadatas = [], [], []
    for _ in range(n):
        task = tasks[rng.integers(len(tasks))]
        for _ in range(1000):
            prompt, meta = sample_scene(task, rng)
            if prompt not in exclude_prompts:
                break
        assert prompt not in exclude_prompts, f"task {task!r}: 1000 samples all in exclude_prompts"
        images.append(draw(task, meta))
        prompts.append(prompt)
        metadatas.append(meta)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, prompts, metadatas


# ---------------------------------------------------------------- reading pixels

# Pixel reading runs in numpy on (H, W, 3) float arrays: torch's thread pool costs milliseconds
# per op on 32x32 images when the CPU is busy.
PALETTE_RGB = np.array(list(PALETTE.values()), np.float32) / 255  # (K, 3)


def to_hwc(image):
    """(H, W, 3) float32 numpy array of one (3, H, W) image tensor in [0, 1]."""
    if not (image.ndim == 3 and image.shape[0] == 3):
        raise ValueError(f"expected one (3, H, W) image, got {tuple(image.shape)}")
    return image.detach().float().cpu().permute(1, 2, 0).numpy()


def estimate_background(hwc):
    """(3,) median colour of the image border."""
    return np.median(np.concatenate([hwc[0], hwc[-1], hwc[:, 0], hwc[:, -1]]), axis=0)


def label_pixels(hwc):
    """(labels (H, W) int: 0 background, k = palette colour k-1; background (3,)): nearest colour."""
    background = estimate_background(hwc)
    colours = np.concatenate([background[None], PALETTE_RGB])  # (1+K, 3)
    dist2 = ((hwc[:, :, None] - colours) ** 2).sum(-1)  # (H, W, 1+K)
    return dist2.argmin(-1), background


def window_reduce(array, radius, reduce):
    """reduce (np.mean / np.max) over the (2 radius + 1)^2 window around each pixel, edges replicated."""
    height, width = array.shape[:2]
    padded = np.pad(array, [(radius, radius), (radius, radius)] + [(0, 0)] * (array.ndim - 2), mode="edge")
    shifted = [padded[dy:dy + height, dx:dx + width] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    return reduce(np.stack(shifted), axis=0)


def connected_regions(labels):
    """[(label, ys, xs)] of the 4-connected regions of equal non-zero label."""
    height, width = labels.shape
    seen = labels == 0
    regions = []
    for y, x in np.argwhere(~seen):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, pixels = [(y, x)], []
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx] and labels[ny, nx] == labels[y, x]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        ys, xs = np.array(pixels).T
        regions.append((int(labels[y, x]), ys, xs))
    return regions


def detect_objects(image):
    """Objects in one (3, H, W) image in [0, 1], most confident first: [{"class", "color",
    "box": (x0, y0, x1, y1) (end exclusive), "area", "score" (confidence)}]."""
    labels, _ = label_pixels(to_hwc(image))
    detections = []
    for label, ys, xs in connected_regions(labels):
        if len(ys) < MIN_AREA:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        region = np.zeros((y1 - y0, x1 - x0), bool)
        region[ys - y0, xs - x0] = True
        ious = {s: (region & (ideal := shape_mask(s, x1 - x0, y1 - y0))).sum() / (region | ideal).sum() for s in SHAPES}
        shape = max(ious, key=ious.get)
        # confidence = max_shape IoU(region, ideal shape in the region's box) * min(w, h) / max(w, h)
        confidence = ious[shape] * min(x1 - x0, y1 - y0) / max(x1 - x0, y1 - y0)
        if confidence >= MIN_CONFIDENCE:
            detections.append({"class": shape, "color": COLORS[label - 1], "box": (int(x0), int(y0), int(x1), int(y1)),
                               "area": len(ys), "score": float(confidence)})
    return sorted(detections, key=lambda d: -d["score"])


def check_batch(images, prompts, metadata):
    if not (images.ndim == 4 and images.shape[1] == 3):
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not (len(prompts) == len(metadata) == len(images)):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")


def geneval_reward(images, prompts, metadata):
    """scores = Flow-GRPO's partial credit, info["strict"] = GenEval accuracy (0/1), both (B,), from
    rules.geneval_score on detect_objects' detections."""
    check_batch(images, prompts, metadata)
    for meta in metadata:
        if "include" not in meta:
            raise ValueError(f"geneval_reward needs GenEval metadata with 'include', got {meta}")
    # detect_objects already dropped detections under MIN_CONFIDENCE, so GenEval's thresholds are off
    results = [geneval_score(detect_objects(img), meta, threshold=0.0, counting_threshold=0.0)
               for img, meta in zip(images, metadata)]
    # Flow-GRPO's partial credit can be negative (3 circles for "a circle": 1 - 2/1); clamp at 0
    partial, strict = [max(r[0], 0.0) for r in results], [r[1] for r in results]
    return torch.tensor(partial, dtype=torch.float32), {"strict": torch.tensor(strict, dtype=torch.float32)}


# (20, 35) glyph templates, zero mean and unit norm, for correlation matching
_TEMPLATES = np.stack([FONT[c].ravel() for c in CHARSET]).astype(np.float32)
_TEMPLATES -= _TEMPLATES.mean(1, keepdims=True)
_TEMPLATES /= np.linalg.norm(_TEMPLATES, axis=1, keepdims=True)


def read_text(image):
    """String in one (3, H, W) image: ink = colour distance to the border colour, normalised by its
    98th percentile; the ink's extent gives the glyph scale (height 7 or 14) and the number of
    6-px-pitch cells; each cell is the glyph of highest correlation over +-1 px shifts."""
    hwc = to_hwc(image)
    ink = np.linalg.norm(hwc - estimate_background(hwc), axis=-1)  # (H, W)
    ink = np.clip(ink / max(float(np.quantile(ink, 0.98)), 0.25), 0, 1)
    mask = ink > 0.5
    mask &= window_reduce(mask.astype(np.float32), 1, np.sum) > 1  # isolated pixels are noise, not ink
    if not mask.any():
        return ""
    ys, xs = np.nonzero(mask)
    scale = 2 if ys.max() + 1 - ys.min() >= 11 else 1
    # width of n glyphs = 6 scale n - scale
    n_chars = max(1, round((xs.max() + 1 - xs.min() + scale) / (6 * scale)))
    pad = 8 * scale  # lets shifted cells run past the border
    ink = np.pad(ink, pad)
    text = ""
    for k in range(n_chars):
        best_corr, best_char = -2.0, ""
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            top, left = pad + ys.min() + dy, pad + xs.min() + 6 * scale * k + dx
            cell = ink[top:top + 7 * scale, left:left + 5 * scale]
            cell = cell.reshape(7, scale, 5, scale).mean((1, 3)).ravel()  # (35,) at font resolution
            cell = cell - cell.mean()
            corr = _TEMPLATES @ cell / (np.linalg.norm(cell) + 1e-6)  # (20,) Pearson correlations
            if corr.max() > best_corr:
                best_corr, best_char = float(corr.max()), CHARSET[int(corr.argmax())]
        text += best_char
    return text


def ocr_reward(images, prompts, metadata):
    """scores = rules.ocr_score (Flow-GRPO: 1 - capped edit distance / length, substring -> 1) of
    read_text against the prompt's quoted text (B,); info (B,) each: "exact" = recognised == target,
    "char_accuracy" = share of the target's glyphs read right in their own slot, "copies" = 1 where
    the second glyph is read as the first although the target's differ."""
    check_batch(images, prompts, metadata)
    targets, read = [quoted_target(p) for p in prompts], [read_text(img) for img in images]
    scores = [ocr_score(r, t) for t, r in zip(targets, read)]
    info = {"exact": [t.lower().replace(" ", "") == r.lower() for t, r in zip(targets, read)],
            "char_accuracy": [sum(a == b for a, b in zip(r, t)) / len(t) for r, t in zip(read, targets)],
            "copies": [len(r) >= 2 and r[1] == r[0] and t[1] != t[0] for r, t in zip(read, targets)]}
    return (torch.tensor(scores, dtype=torch.float32),
            {k: torch.tensor(v, dtype=torch.float32) for k, v in info.items()})


def _named(prompt, vocabulary):
    """First word of `prompt` in `vocabulary`, plurals made singular ("circles" -> "circle"), or None."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        singular = word[:-1] if word.endswith("s") and word[:-1] in vocabulary else word
        if singular in vocabulary:
            return singular
    return None


AESTHETIC_TERMS = ("score", "single", "size", "centre", "clean", "contrast", "align")
SIZE_RAMP = (0.15, 0.45, 0.95, 0.1)  # the size term: rises from side 0.15 over 0.45, falls to 0 at 0.95 over 0.1


def aesthetic_terms(image, prompt, size_ramp=SIZE_RAMP, bare_rms=1.0):
    """Dict of the aesthetic judge's terms in [0, 1] for one image (see aesthetic_reward). `size_ramp`
    (start, rise, end, fall) shapes the size term; `bare_rms` is the clutter assumed when no background
    pixel lies far from the objects (toy/framed.py's close-up judge: 0)."""
    hwc = to_hwc(image)
    labels, background = label_pixels(hwc)
    detections = detect_objects(image)
    if not detections:
        return dict.fromkeys(AESTHETIC_TERMS, 0.0)
    main = max(detections, key=lambda d: d["area"])
    height, width = labels.shape
    # single = main object's pixels / all non-background pixels (two equal objects: 1/2)
    single = main["area"] / (labels != 0).sum()
    # size: side = sqrt(box area) / W; with SIZE_RAMP 0 at side 0.15, 1 from 0.6 (~19 px at 32) to 0.85, 0 at 0.95
    x0, y0, x1, y1 = main["box"]
    side = np.sqrt((x1 - x0) * (y1 - y0)) / width
    start, rise, end, fall = size_ramp
    size = float(np.clip((side - start) / rise, 0, 1) * np.clip((end - side) / fall, 0, 1))
    # centre: box centre 1 within 2 px of the image centre, 0 at 0.3 W further
    dist = np.hypot((x0 + x1 - width) / 2, (y0 + y1 - height) / 2)
    centre = 1 - float(np.clip((dist - 2) / (0.3 * width), 0, 1))
    # clean: RMS deviation from the background colour of the 3x3-smoothed image, >= 3 px from objects
    near_object = window_reduce(labels != 0, 3, np.max)
    deviation = np.linalg.norm(window_reduce(hwc, 1, np.mean) - background, axis=-1)[~near_object]
    rms = float(np.sqrt(np.mean(deviation ** 2))) if deviation.size else bare_rms
    clean = 1 - float(np.clip((rms - 0.03) / 0.15, 0, 1))
    # contrast: |object colour - background| / 0.75 (RGB distance in [0, sqrt 3]; green on black: 0.76)
    in_box = labels[y0:y1, x0:x1] == COLORS.index(main["color"]) + 1
    object_rgb = hwc[y0:y1, x0:x1][in_box].mean(0)
    contrast = min(float(np.linalg.norm(object_rgb - background)) / 0.75, 1.0)
    # align = 1 if the main object has every colour and shape the prompt names, else 0 (strict: a
    # wrong shape cannot be traded for size)
    wanted = [(_named(prompt, COLORS), main["color"]), (_named(prompt, SHAPES), main["class"])]
    align = float(all(w == got for w, got in wanted if w))
    # score = align * single * (0.7 size * centre + 0.15 clean + 0.15 contrast)
    score = align * single * (0.7 * size * centre + 0.15 * clean + 0.15 * contrast)
    return dict(zip(AESTHETIC_TERMS, map(float, (score, single, size, centre, clean, contrast, align))))


def aesthetic_reward(images, prompts, metadata):
    """scores = the toy aesthetic preference, align * single * (0.7 size * centre + 0.15 clean + 0.15
    contrast) (B,); info = its other terms, (B,) each (aesthetic_terms; departure 5)."""
    check_batch(images, prompts, metadata)
    terms = [aesthetic_terms(img, prompt) for img, prompt in zip(images, prompts)]
    info = {k: torch.tensor([t[k] for t in terms], dtype=torch.float32) for k in AESTHETIC_TERMS}
    return info.pop("score"), info


# ---------------------------------------------------------------- dataset files

def geneval_split(rng):
    """{tag: (test metadatas, train metadatas)}: small tags (< SMALL_TAG prompts) test on their
    training prompts (held out by seed), the others hold out 32 prompts."""
    split = {}
    for tag in GENEVAL_TAGS:
        metas = [GENEVAL_SPACE[tag][i] for i in rng.permutation(len(GENEVAL_SPACE[tag]))]
        split[tag] = (metas, metas) if len(metas) < SMALL_TAG else (metas[:32], metas[32:])
    return split


def write_datasets(root=DATA, seed=0):
    """<root>/<task>/{train,test}.txt (one prompt per line) + {train,test}_metadata.jsonl + task.json
    (data.py: reward, teacher guidance of paper section 7, evaluation key); returns {task: (n_train,
    n_test)}. GenEval: 32 test and 64 training lines per tag, the tags in turn, a tag's prompts cycled
    where it has fewer (so every prefix of either file is balanced across tags); OCR 320/80 distinct
    strings; aesthetic 156/60 of 12 templates x 6 colours x 3 shapes."""
    rng = np.random.default_rng(seed)
    split = geneval_split(rng)
    cycled = {name: [split[tag][k][i % len(split[tag][k])] for i in range(n) for tag in GENEVAL_TAGS]
              for name, k, n in (("test", 0, 32), ("train", 1, 64))}
    splits = {"geneval": (cycled["test"], cycled["train"])}
    texts = []  # OCR: distinct texts, so test strings are never seen in training
    while len(texts) < 80 + 320:  # all 400 two-character strings
        text = _random_text(rng)
        texts += [text] if text not in texts else []
    metas = [ocr_metadata(t, rng) for t in texts]
    splits["ocr"] = (metas[:80], metas[80:])
    aesthetic = [{"prompt": t.format(c=c, s=s), "color": c, "shape": s}
                 for t, c, s in itertools.product(AESTHETIC_TEMPLATES, COLORS, SHAPES)]
    aesthetic = [aesthetic[i] for i in rng.permutation(len(aesthetic))]
    splits["aesthetic"] = (aesthetic[:60], aesthetic[60:])
    task_specs = {"geneval": {"reward": "toy_geneval=1", "guidance": 4.5, "eval_key": "strict"},
                  "ocr": {"reward": "toy_ocr=1", "guidance": 4.5},
                  "aesthetic": {"reward": "toy_aesthetic=1", "guidance": 4.5}}
    for task, (test, train) in splits.items():  # task.json names this module: data.load_task registers toy_*
        write_prompt_set(Path(root) / task, train, test, dict(task_specs[task], reward_module="toy.world"))
    return {task: (len(train), len(test)) for task, (test, train) in splits.items()}


def held_out_prompts(root=DATA):
    """Test prompts that no training prompt repeats: never shown in pretraining."""
    held = set()
    for task in TASKS:
        test, train = (set(load_prompts(f"{root}/{task}", split)[0]) for split in ("test", "train"))
        held |= test - train
    return held


def write_grid(path, per_row=8, seed=0):
    """PNG of pretraining renders, 4x upscaled with captions: each task without and with its defect."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, rate in itertools.product(TASKS, (0.0, 1.0)):
        scenes = [sample_scene(task, rng) for _ in range(per_row)]
        rows.append([(p, render(task, m, rng, rate)) for p, m in scenes])
    save_captioned_grid(path, rows)


def save_captioned_grid(path, rows):
    """PNG of rows of (prompt, uint8 (H, W, 3) image), each image 4x upscaled above its caption."""
    from PIL import Image, ImageDraw
    tile, caption, per_row = 4 * IMAGE_SIZE, 46, max(len(row) for row in rows)
    grid = Image.new("RGB", (per_row * (tile + 4), len(rows) * (tile + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, (prompt, image) in enumerate(row):
            x, y = c * (tile + 4), r * (tile + caption)
            grid.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x, y))
            draw.multiline_text((x + 1, y + tile + 1), "\n".join(textwrap.wrap(prompt, 24)[:3]), fill="black")
    grid.save(path)


def colour_check(model, template="a photo of a {c} {s}", per_shape=4, steps=20, guidance=4.5, seed=0):
    """{named colour: {drawn colour or None: images}}: the colour of the most confident object the
    pipeline folder `model` draws for `template` with each colour and shape, `per_shape` images each
    (ODE `steps`, CFG `guidance`, one generator seeded `seed` per colour). A model that ignores a
    colour word gives that word the same row as another ignored word."""
    from model import FlowModel  # quiet loading, the model's own prompt length
    flow = FlowModel.load(model)
    pipe = flow.pipe
    table = {}
    for c in COLORS:
        prompts = [template.format(c=c, s=s) for s in SHAPES for _ in range(per_shape)]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                      max_sequence_length=flow.max_sequence_length,
                      generator=torch.Generator().manual_seed(seed)).images
        drawn = [(detect_objects(x) or [{"color": None}])[0]["color"] for x in images]
        table[c] = {d: drawn.count(d) for d in dict.fromkeys(drawn)}
    return table


def world_parser(doc: str, data: Path, grid_help: str) -> argparse.ArgumentParser:
    """The command line every toy world shares: --write-datasets (into --root), --seed, --grid PATH."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--write-datasets", action="store_true", help="regenerate the prompt files")
    parser.add_argument("--root", default=data, help="dataset folder for --write-datasets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", help=grid_help)
    return parser


def write_files(args, write_datasets, write_grid) -> None:
    """What world_parser's flags ask for: the prompt files and/or the grid, each said in one line."""
    if args.write_datasets:
        for task, (n_train, n_test) in write_datasets(args.root, args.seed).items():
            print(f"{args.root}/{task}: {n_train} train, {n_test} test prompts")
    if args.grid:
        write_grid(args.grid, seed=args.seed)
        print(f"wrote {args.grid}")


def main(argv=None):
    """--write-datasets, --grid, --colour-check (module docstring)."""
    parser = world_parser(__doc__, DATA, "write a PNG grid of pretraining renders (without and with defects)")
    parser.add_argument("--colour-check", metavar="MODEL",
                        help="which colour this pipeline folder draws for each colour word (colour_check)")
    parser.add_argument("--template", default="a photo of a {c} {s}", help="prompt of --colour-check")
    args = parser.parse_args(argv)
    if not (args.write_datasets or args.grid or args.colour_check):
        parser.error("nothing to do: pass --write-datasets, --grid PATH and/or --colour-check MODEL")
    if args.colour_check:
        if not (Path(args.colour_check) / "model_index.json").exists():
            parser.error(f"--colour-check {args.colour_check}: not a pipeline folder (no model_index.json)")
        if not {"{c}", "{s}"} <= set(re.findall(r"\{\w\}", args.template)):
            parser.error(f"--template {args.template!r}: needs {{c}} (colour) and {{s}} (shape)")
    write_files(args, write_datasets, write_grid)
    if args.colour_check:
        table = colour_check(args.colour_check, args.template, seed=args.seed)
        right = sum(row.get(c, 0) for c, row in table.items()) / sum(sum(r.values()) for r in table.values())
        print(f"{args.template!r}: the named colour drawn in {right:.2f} of the images")
        for c, row in table.items():
            print(f"  {c:>7}: " + ", ".join(f"{d} {n}" for d, n in sorted(row.items(), key=lambda kv: -kv[1])))


# ---------------------------------------------------------------- the rewards in the registry

def register_reward(name, fn):
    """REWARDS[name]: a pure function with the registry's signature, no device and no options."""
    @register(name)
    def factory(device, dtype, **options):
        if options:
            raise ValueError(f"reward {name!r} takes no options, got {options}")
        return fn
    return factory


# data/toy/<task>/task.json names this module as its "reward_module": loading a toy task registers these
for _name, _fn in (("toy_geneval", geneval_reward), ("toy_ocr", ocr_reward), ("toy_aesthetic", aesthetic_reward)):
    if _name not in REWARDS:  # once, also when this file runs as `python -m toy.world` and is imported too
        register_reward(_name, _fn)

if __name__ == "__main__":
    main()
