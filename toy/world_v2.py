"""Toy world v2, the candidate that replaces toy/world.py once its base and teachers are rebuilt
(issue 27; until then the shipped base, teachers and every committed number rest on toy/world.py).

Same scenes, font, pixel readers and GenEval/OCR rules as toy/world.py, which this module imports;
what changes is the structure of each task, so that each one has the aesthetic task's shape: the
base reliably has the content skill, and the headroom is a removable, prompt-independent defect of
the pretraining renders that only that task's reward penalises (docs/toy-world.md, "World v2"):

  geneval   deterministic layouts: the first-named object on the left (or where the relation puts
            it), n objects of a count in fixed slots, one object in the centre box. Position
            prompts name no colour, as GenEval's own. Defect: every object cracked by a 2-px
            vertical gap; the detector accepts neither half, so GenEval's strict rule fails.
  ocr       two glyphs at one central place, as v1, and each glyph has a slot-bound T5 token
            (T5_PIECES: '"A' is "A in the first slot", 'A"' is "A in the second slot"), so a test
            string is a new pair of seen tokens. Defect: a 4x4 blot of the text's ink in the top-left
            corner (BLOT); the glyphs are intact, but the reader's crop is the ink's extent, so it
            reads other glyphs (scores 0), as a real text detector's box would take in the blot.
  aesthetic the crisp 16-px centred object of GenEval's single object, and v1's judge with a strict
            prompt term: a wrong shape or colour scores 0, so no teacher can trade shape for size.
            Defect: an amateur picture, a 12-px object in a corner slot on a grey ramp (the judge's
            size, centre and clean terms; 0.14 against 0.84). Templates never say "photo of"
            (GenEval's), so every task's prompts are unmistakably its own.

Every task draws its defect in DEFECT_RATE of the pretraining renders; each defect is independent of
the prompt and only its own task's reward penalises it.

Splits: every T5 token of every test prompt occurs in a training prompt (tests/test_toy_v2.py).
GenEval's small tags (fewer than SMALL_TAG prompts: single object, two objects, counting, colours,
position) are held out by seed, as GenEval samples 4 images a prompt: their test lines are training prompts
evaluated from unseen noise; colour attribution holds out 32 prompts. OCR holds out
80 of the 400 strings, aesthetic 60 of its 216 prompts.

Departures from the paper's tasks (besides toy/world.py's 1-6):
 7. The headroom of every task is a defect planted in the pretraining renders (cracked shapes, a
    blot beside the text, an amateur picture), not a missing skill: on the real SD3.5-M the GenEval teacher learns counting
    and binding the base lacks. A planted defect makes each teacher's gain large, reliable across
    seeds and independent of the prompt, which a CPU-sized model cannot get from learning a skill.
    The OCR blot spoils the reading only because the template reader crops the ink's extent; a
    real OCR model would often read past it.
 8. Layouts are a function of the prompt (GenEval's evaluation only compares centres, so any
    layout that satisfies the relation counts).

Run (CPU, seconds):
  python -m toy.world_v2 --write-datasets        # data/toy2/<task>/ (prompts, metadata, task.json)
  python -m toy.world_v2 --grid toy2_grid.png    # pretraining renders of each task, without and with its defect
  python -m pytest tests/test_toy_v2.py -q
"""
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from rewards import REWARDS
from rules import GENEVAL_TAGS, quoted_target
from toy import world as v1
from toy.world import (CHARSET, COLORS, IMAGE_SIZE, OCR_LENGTH, OCR_SCALE, SHAPES,
                       draw_scene, draw_text, shape_mask)

TASKS = v1.TASKS
DATA = "data/toy2"     # the tasks' prompt folders, data/toy2/<task> (inside the repository)
DEFECT_RATE = 0.5      # share of GenEval and OCR pretraining renders drawn with the task's defect
CRACK = 2              # px: the gap of a defective GenEval object
SMALL_TAG = 64         # GenEval tags with fewer prompts than this are held out by seed, not by prompt

# GenEval slots (x0, y0, x1, y1), end exclusive: one object in the 16-px centre box, pairs side by
# side or one above the other in 12-px boxes 4 px apart, counts in fixed slots
CENTRE = (8, 8, 24, 24)
LEFT, RIGHT, TOP, BOTTOM = (2, 10, 14, 22), (18, 10, 30, 22), (10, 2, 22, 14), (10, 18, 22, 30)
GRID = ((2, 2, 14, 14), (18, 2, 30, 14), (2, 18, 14, 30), (18, 18, 30, 30))
COUNT_SLOTS = {1: (CENTRE,), 2: (LEFT, RIGHT), 3: (GRID[0], GRID[1], BOTTOM), 4: GRID}
# "A rel B" -> (A's box, B's box)
RELATION_SLOTS = {"left of": (LEFT, RIGHT), "right of": (RIGHT, LEFT), "above": (TOP, BOTTOM),
                  "below": (BOTTOM, TOP)}
# GenEval's prompts: v1's, but position prompts name no colour, as GenEval's own ("a photo of a
# dog right of a teddy bear"): 6 ordered shape pairs x 4 relations
GENEVAL_SPACE = {tag: [m for m in metas if tag != "position" or not any("color" in c for c in m["include"])]
                 for tag, metas in v1.GENEVAL_SPACE.items()}
BLOT = (2, 2, 6, 6)    # OCR defect: a 4x4 blot of the text's colour in the top-left corner
OCR_TEMPLATES = v1.OCR_TEMPLATES
AESTHETIC_TEMPLATES = tuple(t.replace("CS", "{c} {s}") for t in (
    "a beautiful CS", "an elegant CS", "a simple CS, minimalist", "a CS, high quality",
    "a CS, award winning", "a CS, clean design", "a stunning CS", "a lovely CS", "a CS icon",
    "a CS logo", "an artwork of a CS", "a CS, 4k wallpaper"))
# slot-bound T5 pieces of the OCR text: '"A' (after a space: the first glyph) and 'A"' (the second)
T5_PIECES = tuple("\u2581\"" + c for c in CHARSET) + tuple(c + "\"" for c in CHARSET)


# ---------------------------------------------------------------- renders

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
        image[:] = v1.grey_ramp()
        x0, y0, x1, y1 = GRID[rng.integers(len(GRID))]
        image[y0:y1, x0:x1][shape_mask(shape, x1 - x0, y1 - y0)] = v1.PALETTE[color]
        return image
    if task == "ocr":
        text = metadata["text"]
        if not (len(text) == OCR_LENGTH and set(text) <= set(CHARSET)):
            raise ValueError(f"text {text!r}: {OCR_LENGTH} chars of {CHARSET}")
        width, height = 6 * OCR_SCALE * len(text) - OCR_SCALE, 7 * OCR_SCALE  # 22 x 14 px
        x0, y0 = (IMAGE_SIZE - width) // 2, (IMAGE_SIZE - height) // 2
        color = metadata.get("color") or v1._random_color(rng)
        image = draw_text(draw_scene([]), text, color, x0, y0, OCR_SCALE)
        if defective:  # a blot of the text's ink in the corner: the glyphs themselves stay intact
            bx0, by0, bx1, by1 = BLOT
            image[by0:by1, bx0:bx1] = v1.PALETTE[color]
        return image
    if task != "geneval":
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    objects = [(clause["class"], clause.get("color") or v1._random_color(rng))
               for clause in metadata["include"] for _ in range(clause["count"])]
    image = draw_scene([])
    for (shape, color), (x0, y0, x1, y1) in zip(objects, geneval_layout(metadata)):
        mask = shape_mask(shape, x1 - x0, y1 - y0)
        image[y0:y1, x0:x1][crack(mask) if defective else mask] = v1.PALETTE[color]
    return image


def sample_scene(task, rng):
    """(prompt, metadata) of a random scene of `task`: v1's, with v2's GENEVAL_SPACE and templates."""
    return v1.sample_scene(task, rng, GENEVAL_SPACE, AESTHETIC_TEMPLATES)


def sample_batch(n, rng, tasks=TASKS, exclude_prompts=frozenset(), defect_rate=DEFECT_RATE):
    """Pretraining batch: (images (n, 3, 32, 32) float in [0, 1], prompts, metadatas), tasks uniform
    from `tasks`, never a prompt in `exclude_prompts` (the prompts held out by prompt)."""
    return v1.sample_batch(n, rng, tasks, exclude_prompts, scene_fn=sample_scene,
                           render_fn=lambda task, meta, rng: render(task, meta, rng, defect_rate))


# ---------------------------------------------------------------- rewards

def geneval_reward(images, prompts, metadata):
    """v1's (toy.world.geneval_reward): partial credit as scores, info["strict"]."""
    return v1.geneval_reward(images, prompts, metadata)


def ocr_reward(images, prompts, metadata):
    """v1's OCR reward (Flow-GRPO's rule on the template reader), plus per-image diagnostics:
    info["char_accuracy"] = share of the target's glyphs read right at their own slot;
    info["copies"] = 1 where the second glyph is read as the first although the target's differ."""
    scores, info = v1.ocr_reward(images, prompts, metadata)
    targets, read = [quoted_target(p) for p in prompts], [v1.read_text(img) for img in images]
    info["char_accuracy"] = torch.tensor(
        [sum(a == b for a, b in zip(r, t)) / len(t) for r, t in zip(read, targets)], dtype=torch.float32)
    info["copies"] = torch.tensor([float(len(r) >= 2 and r[1] == r[0] and t[1] != t[0])
                                   for r, t in zip(read, targets)], dtype=torch.float32)
    return scores, info


def aesthetic_reward(images, prompts, metadata):
    """v1's judge (toy.world.aesthetic_terms) with a strict prompt term: score = [the main object
    has every colour and shape the prompt names] * single * (0.7 size * centre + 0.15 clean + 0.15
    contrast); info["align"] = that indicator, and the other terms."""
    v1._check_batch(images, prompts, metadata)
    terms = [v1.aesthetic_terms(img, prompt) for img, prompt in zip(images, prompts)]
    for t in terms:
        # v1's align = (1 + attributes matched) / (1 + attributes named): 1 iff every one matched
        t["align"] = float(t["align"] == 1.0)
        t["score"] = t["align"] * t["single"] * (0.7 * t["size"] * t["centre"] + 0.15 * t["clean"]
                                                 + 0.15 * t["contrast"])
    info = {k: torch.tensor([t[k] for t in terms], dtype=torch.float32) for k in v1.AESTHETIC_TERMS}
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
    """<root>/<task>/{train,test}.txt + {train,test}_metadata.jsonl + task.json; returns {task:
    (n_train, n_test)}. GenEval: 32 test and 64 training lines per tag, the tags in turn, a tag's
    prompts cycled where it has fewer (so every prefix of either file is balanced across tags);
    OCR 320/80 distinct strings; aesthetic 156/60 of 12 templates x 6 colours x 3 shapes."""
    rng = np.random.default_rng(seed)
    split = geneval_split(rng)
    cycled = {name: [split[tag][k][i % len(split[tag][k])] for i in range(n) for tag in GENEVAL_TAGS]
              for name, k, n in (("test", 0, 32), ("train", 1, 64))}
    splits = {"geneval": (cycled["test"], cycled["train"])}
    texts = []  # OCR: distinct texts, so test strings are never seen in training
    while len(texts) < 80 + 320:  # all 400 two-character strings
        text = v1._random_text(rng)
        texts += [text] if text not in texts else []
    metas = [v1.ocr_metadata(t, rng) for t in texts]
    splits["ocr"] = (metas[:80], metas[80:])
    aesthetic = [{"prompt": t.format(c=c, s=s), "color": c, "shape": s}
                 for t, c, s in itertools.product(AESTHETIC_TEMPLATES, COLORS, SHAPES)]
    aesthetic = [aesthetic[i] for i in rng.permutation(len(aesthetic))]
    splits["aesthetic"] = (aesthetic[:60], aesthetic[60:])
    task_specs = {"geneval": {"reward": "toy2_geneval=1", "guidance": 4.5, "eval_key": "strict"},
                  "ocr": {"reward": "toy2_ocr=1", "guidance": 4.5},
                  "aesthetic": {"reward": "toy2_aesthetic=1", "guidance": 4.5}}
    for task, (test, train) in splits.items():
        folder = Path(root) / task
        folder.mkdir(parents=True, exist_ok=True)
        for name, metas in (("test", test), ("train", train)):
            (folder / f"{name}.txt").write_text("".join(m["prompt"] + "\n" for m in metas))
            (folder / f"{name}_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
        spec = dict(task_specs[task], reward_module="toy.world_v2")  # data.load_task registers toy2_*
        (folder / "task.json").write_text(json.dumps(spec, indent=1) + "\n")
    return {task: (len(train), len(test)) for task, (test, train) in splits.items()}


def held_out_prompts(root=DATA):
    """Test prompts that no training prompt repeats: never shown in pretraining."""
    from data import load_prompts
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
    v1.save_captioned_grid(path, rows)


# data/toy2/<task>/task.json names this module as its "reward_module": loading a task registers these
for _name, _fn in (("toy2_geneval", geneval_reward), ("toy2_ocr", ocr_reward),
                   ("toy2_aesthetic", aesthetic_reward)):
    if _name not in REWARDS:  # once, also when this file runs as `python -m toy.world_v2`
        v1._register(_name, _fn)

if __name__ == "__main__":
    v1.main(description=__doc__, root=DATA, write_datasets=write_datasets, write_grid=write_grid)
