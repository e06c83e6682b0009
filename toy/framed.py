"""A candidate third toy world, whose tasks disagree about the camera framing (docs/toy-world.md,
"The third design"). Not shipped: its gates failed (a single-task teacher's framing leaks onto other
tasks' prompts, but a joint run learns each task's framing from its prompt and beats the single-task
teachers), so it stays as the record of that attempt and the base of the next design, with its
instrument (toy/framing.py).

The second world (toy/world.py) gives each task a planted, prompt-independent defect that only its
own reward penalises, so its tasks cannot conflict and its joint baselines cannot show interference.
Here the content is toy/world.py's defect-free content (`draw_content`: GenEval layouts, OCR's two
glyphs, the aesthetic task's centred object), and every pretraining render is seen through a camera
zoomed about the image centre by one of ZOOMS (`frame`), drawn independently of the task and the
prompt and never named by a prompt. The rewards disagree about the framing (renders; `python -m
toy.framing --renders 300`):
  zoom               1.0 (WIDE)   1.6 (CLOSE)   2.0
  GenEval strict       1.00         0.42         0.28   (multi-object tags cropped; single object and
                                                          colours keep 1.00 at 1.6, ~0.65 at 2.0)
  OCR                  1.00         0.02         0.03   (glyphs cropped and off the reader's scale)
  aesthetic judge      0.30         1.00         0.20   (an interior optimum: 2.0 crops the object)
GenEval and OCR use toy/world.py's rewards; the aesthetic task uses the close-up judge
(`aesthetic_reward`, registered as toy3_aesthetic): toy/world.py's judge with its size term moved
to the close-up (0 up to a 0.55-wide box, 1 from 0.75 to 0.86, 0 from 0.96; the wide framing's
16-px object is 0.5 wide) and no clutter counted when no background is left (a close-up square).
`estimate_zoom` reads an image's framing back (the ZOOMS render of its prompt whose foreground
overlaps the image's most); toy/framing.py measures a model's framings with it.

Prompt sets: data/toy3/<task>, toy/world.py's prompts and splits, the aesthetic task.json naming the
close-up judge. Departures from the paper's tasks: toy/world.py's 1-6; its 7 (a planted defect) is
replaced by the framing: the headroom of every task is a framing its reward prefers, so a teacher's
gain is a global property of the image that can leak onto other tasks' prompts, as style and layout
do in the paper.

Run (CPU, seconds):
  python -m toy.framed --write-datasets     # data/toy3/<task>/ (then study.mixed for data/toy3/mixed)
  python -m study.mixed --tasks data/toy3/geneval data/toy3/ocr data/toy3/aesthetic --out data/toy3/mixed
  python -m toy.framed --grid framed_grid.png   # pretraining renders of each task at each framing
  python -m toy.pretrain --world toy.framed --init models/toy-sd3 --steps 2000 --out runs/toy3-sd3
  python -m pytest tests/algorithm/test_toy_framed.py -q
"""
import json
from pathlib import Path

import numpy as np
import torch

from rewards import REWARDS
from toy import world
from toy.world import (CENTRE, TASKS, draw_scene, random_color, register_reward, sample_scene,
                       save_captioned_grid, to_hwc)

DATA = "data/toy3"         # the candidate's prompt folders: toy/world.py's prompts, the close-up judge
ZOOMS = (1.0, 1.6, 2.0)    # camera framings: zoom about the image centre, uniform in pretraining, never named
WIDE, CLOSE = 1.0, 1.6     # GenEval's and OCR's best framing; the close-up judge's (an interior optimum)
BEST_ZOOM = {"geneval": WIDE, "ocr": WIDE, "aesthetic": CLOSE}  # each task's reward's favourite framing
CLOSE_UP_RAMP = (0.55, 0.2, 0.96, 0.1)  # the judge's size term: 0 up to side 0.55, 1 from 0.75 to 0.86, 0 from 0.96


def frame(image, zoom):
    """uint8 (H, W, 3) `image` seen by a camera zoomed by `zoom` about its centre: output pixel x
    shows source pixel floor(c + (x + 1/2 - c) / zoom), c = W / 2 (nearest neighbour, so the palette
    stays exact); zoom > 1 enlarges the content and crops what leaves the frame."""
    n = image.shape[0]
    index = np.floor(n / 2 + (np.arange(n) + 0.5 - n / 2) / zoom).astype(int)
    return image[index][:, index]


def draw_content(task, metadata, rng):
    """uint8 (32, 32, 3) content of `metadata` at the wide framing (zoom 1), toy/world.py's defect-free
    render: the aesthetic object in the 16-px centre box, GenEval's layouts in their slots, OCR's two
    glyphs in the centre."""
    if task == "aesthetic":
        return draw_scene([{"class": metadata["shape"], "color": metadata["color"], "box": CENTRE}])
    if task == "ocr":
        return world.ocr_scene(metadata["text"], metadata.get("color") or random_color(rng))
    if task != "geneval":
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return draw_scene([{"class": shape, "color": color, "box": box}
                       for shape, color, box in world.geneval_objects(metadata, rng)])


def render(task, metadata, rng, zoom=None):
    """uint8 (32, 32, 3) pretraining render of `metadata`: its content framed at `zoom` (None: drawn
    uniformly from ZOOMS)."""
    if zoom is None:
        zoom = ZOOMS[rng.integers(len(ZOOMS))]
    return frame(draw_content(task, metadata, rng), zoom)


def sample_batch(n, rng, tasks=TASKS, exclude_prompts=frozenset(), zooms=ZOOMS):
    """Pretraining batch: (images (n, 3, 32, 32) float in [0, 1], prompts, metadatas), tasks uniform
    from `tasks`, never a prompt in `exclude_prompts` (pass the held-out prompts), each render framed
    at a zoom drawn uniformly from `zooms` (repeat a zoom to weight it), independently of the task and
    the prompt."""
    return world.draw_batch(n, rng, tasks, exclude_prompts,
                            lambda task, meta: render(task, meta, rng, zooms[rng.integers(len(zooms))]))


def foreground(hwc):
    """(H, W) bool: pixels far from the world's black background (a channel above 0.35; every
    palette colour has one above 0.74)."""
    return hwc.max(-1) > 0.35


def estimate_zoom(image, task, metadata, zooms=ZOOMS):
    """(zoom, IoU): the framing of one (3, H, W) image in [0, 1] of `task`'s `metadata`, the zoom of
    `zooms` whose render's foreground mask overlaps the image's most (colours do not enter the mask;
    an image of nothing recognisable still gets its nearest framing, with a low IoU). Ties go to the
    first zoom."""
    mask = foreground(to_hwc(image))
    best = (zooms[0], -1.0)
    for zoom in zooms:
        ideal = frame(draw_content(task, metadata, np.random.default_rng(0)), zoom).any(-1)
        iou = float((mask & ideal).sum() / max((mask | ideal).sum(), 1))
        best = max(best, (zoom, iou), key=lambda b: b[1])
    return best


def aesthetic_terms(image, prompt):
    """The close-up judge's terms (toy/world.py's judge with CLOSE_UP_RAMP, no clutter without background)."""
    return world.aesthetic_terms(image, prompt, size_ramp=CLOSE_UP_RAMP, bare_rms=0.0)


def aesthetic_reward(images, prompts, metadata):
    """scores = the close-up judge, align * single * (0.7 size * centre + 0.15 clean + 0.15 contrast) (B,);
    info = its other terms, (B,) each."""
    world.check_batch(images, prompts, metadata)
    terms = [aesthetic_terms(img, prompt) for img, prompt in zip(images, prompts)]
    info = {k: torch.tensor([t[k] for t in terms], dtype=torch.float32) for k in world.AESTHETIC_TERMS}
    return info.pop("score"), info


REWARD_OF = {"geneval": world.geneval_reward, "ocr": world.ocr_reward, "aesthetic": aesthetic_reward}


def write_datasets(root=DATA, seed=0):
    """toy/world.py's prompt sets under <root>, the aesthetic task.json naming the close-up judge."""
    counts = world.write_datasets(root, seed)
    spec_path = Path(root) / "aesthetic" / "task.json"
    spec = json.loads(spec_path.read_text())
    spec.update(reward="toy3_aesthetic=1", reward_module="toy.framed")
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    return counts


def held_out_prompts(root=DATA):
    """Test prompts that no training prompt repeats: never shown in pretraining."""
    return world.held_out_prompts(root)


def write_grid(path, per_row=8, seed=0):
    """PNG of pretraining renders, 4x upscaled with captions: each task at each framing of ZOOMS."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in TASKS:
        scenes = [sample_scene(task, rng) for _ in range(per_row)]
        rows += [[(f"zoom {zoom}: {p}", render(task, m, rng, zoom)) for p, m in scenes] for zoom in ZOOMS]
    save_captioned_grid(path, rows)


def main(argv=None):
    """--write-datasets, --grid (module docstring)."""
    parser = world.world_parser(__doc__, DATA, "write a PNG grid of pretraining renders (each task at each framing)")
    args = parser.parse_args(argv)
    if not (args.write_datasets or args.grid):
        parser.error("nothing to do: pass --write-datasets and/or --grid PATH")
    world.write_files(args, write_datasets, write_grid)


# data/toy3/aesthetic/task.json names this module as its "reward_module": loading the task registers it
if "toy3_aesthetic" not in REWARDS:
    register_reward("toy3_aesthetic", aesthetic_reward)

if __name__ == "__main__":
    main()
