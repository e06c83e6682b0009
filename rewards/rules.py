"""The scoring rules of the paper's rule-based rewards (section 10), shared by the real rewards
(rewards/geneval.py: Mask2Former + CLIP; rewards/ocr.py: an OCR engine) and the toy world's pixel readers
(toy/world.py).

GenEval (github.com/djghosh13/geneval, evaluation/evaluate_images.py): `geneval_score(detections,
metadata)` -> (Flow-GRPO's partial credit, GenEval's strict all-clauses accuracy) for one image, from
detections {"class", "color", "box", "score"}. Thresholds 0.3 (0.9 for counting), at most 16 objects,
position margin 0.1; a count clause earns 1 - |n_req - n_found| / n_req. `check_geneval_metadata`
type-checks a prompt's metadata when a dataset is loaded (data.py), before any model.

OCR (Flow-GRPO's ocr.py): the target is the prompt's first double-quoted span (`quoted_target`); both
strings lower-cased with spaces removed; distance 0 if the target is a substring of the recognised text,
else their Levenshtein distance capped at the target's length; `ocr_score` = 1 - distance / length.

Departures: see rewards/geneval.py (4, 5) and rewards/ocr.py, which apply these rules.
"""
import re

import torch

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]


def _kept_objects(detections, tag, threshold, counting_threshold, max_objects):
    """GenEval's filter: per class, score > threshold (counting_threshold for counting prompts), most
    confident first, at most max_objects. -> {class: [detection, ...]}"""
    min_score = counting_threshold if tag == "counting" else threshold
    objects = {}
    for detection in sorted(detections, key=lambda d: -d["score"]):
        if detection["score"] > min_score and len(objects.setdefault(detection["class"], [])) < max_objects:
            objects[detection["class"]].append(detection)
    return objects


def _relations(box_a, box_b, margin):
    """Where box A lies relative to box B (GenEval's relative_position); boxes (x1, y1, x2, y2), y down."""
    centre_a = torch.tensor([box_a[0] + box_a[2], box_a[1] + box_a[3]], dtype=torch.float64) / 2
    centre_b = torch.tensor([box_b[0] + box_b[2], box_b[1] + box_b[3]], dtype=torch.float64) / 2
    size_a = torch.tensor([box_a[2] - box_a[0], box_a[3] - box_a[1]], dtype=torch.float64).abs()
    size_b = torch.tensor([box_b[2] - box_b[0], box_b[3] - box_b[1]], dtype=torch.float64).abs()
    offset = centre_a - centre_b
    # shrink the centre offset by margin * (size_a + size_b) per axis; no relation if nothing is left
    revised = (offset.abs() - margin * (size_a + size_b)).clamp(min=0) * offset.sign()
    if bool((revised.abs() < 1e-3).all()):  # GenEval: a revised offset under 1e-3 px is no relation
        return set()
    # direction = revised offset / |offset| (the unrevised norm, as GenEval); a relation needs > 0.5
    dx, dy = (revised / offset.norm()).tolist()
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                     ("above", dy < -0.5), ("below", dy > 0.5)) if holds}


def geneval_score(detections, metadata, *, threshold=0.3, counting_threshold=0.9, max_objects=16,
                  position_margin=0.1):
    """GenEval's rules on one image's detections -> (partial: float, strict: bool).

    detections: list of dicts, one per detected object, any order and score:
      "class": GenEval/COCO class name, e.g. "dining table", "computer mouse"
      "box":   (x1, y1, x2, y2) in pixels, y pointing down (GenEval's 1e-3 dead zone below is in pixels)
      "score": detector confidence in [0, 1]; filtered here (threshold, counting_threshold, max_objects)
      "color": one of COLORS, or None; required for the most confident `count` objects of a class that
               an include clause asks a colour of
      "mask":  optional, unused by the rules
    metadata: {"tag", "include": [{"class", "count", "color"?, "position"?: [relation, index]}],
               "exclude"?: [{"class", "count"}], ...}
    partial: Flow-GRPO's training reward, the mean of per-clause credits (see the module docstring).
    strict:  GenEval's accuracy: every include and exclude clause holds.
    """
    if "tag" not in metadata or "include" not in metadata:
        raise ValueError(f"GenEval metadata needs 'tag' and 'include': {metadata}")
    objects = _kept_objects(detections, metadata["tag"], threshold, counting_threshold, max_objects)

    def colors_of(found, clause):
        if not all(d.get("color") in COLORS for d in found):
            raise ValueError(f"detections of {clause['class']!r} need a 'color' in {COLORS}: {found}")
        return sum(d["color"] == clause["color"] for d in found)

    def relation_holds(found, clause, groups):
        relation, target = clause["position"]
        return groups[target] is not None and all(
            relation in _relations(d["box"], t["box"], position_margin) for d in found for t in groups[target])

    # strict (GenEval evaluate): the `count` most confident objects exist, have the colour, and every one
    # is in the relation to every object of the referenced clause; exclude: fewer than `count` objects
    strict, groups = True, []
    for clause in metadata["include"]:
        found = objects.get(clause["class"], [])[:clause["count"]]
        matched = len(found) >= clause["count"]
        if matched and "color" in clause:
            matched = colors_of(found, clause) >= clause["count"]
        if matched and "position" in clause:
            matched = relation_holds(found, clause, groups)
        strict = strict and matched
        groups.append(found if matched else None)
    strict = strict and all(len(objects.get(c["class"], [])) < c["count"] for c in metadata.get("exclude", []))

    # partial (Flow-GRPO evaluate_reward): per clause, count credit 1 - |n_req - n_found| / n_req; when the
    # count is exact, colour credit 1 - |n_req - n_colour| / n_req and relation credit 1 or 0; when it is
    # not, one 0 for the colour/relation part. partial = mean of the credits.
    credits, groups = [], []
    for clause in metadata["include"]:
        found, wanted = objects.get(clause["class"], []), clause["count"]
        credits.append(1 - abs(wanted - len(found)) / wanted)
        matched = len(found) == wanted
        if not matched and ("color" in clause or "position" in clause):
            credits.append(0.0)
        if matched and "color" in clause:
            with_color = colors_of(found, clause)
            credits.append(1 - abs(wanted - with_color) / wanted)
            matched = with_color == wanted
        if matched and "position" in clause:
            matched = relation_holds(found, clause, groups)
            credits.append(float(matched))
        groups.append(found if matched else None)
    return sum(credits) / len(credits) if credits else 0.0, strict


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")


def check_geneval_metadata(meta, where: str) -> None:
    """Every field geneval_score reads, type-checked (a ValueError naming `where`, e.g. the file and
    line, and the field): "tag", "include" clauses {"class": str, "count": int >= 1, "color"?: one of
    COLORS, "position"?: [relation, index of an earlier clause]}, optional "exclude" clauses."""
    def bad(what):
        raise ValueError(f"{where}: {what} (GenEval metadata: {{\"tag\", \"include\": [{{\"class\", \"count\", "
                         f"\"color\"?, \"position\"?}}], \"exclude\"?}}); fix that line of the file")
    if not isinstance(meta, dict):
        bad(f"a line is a {type(meta).__name__}, not an object")
    if not isinstance(meta.get("tag"), str):
        bad(f"'tag' must be a string, got {meta.get('tag')!r}")
    for key in ("include", "exclude"):
        clauses = meta.get(key, [])
        if not isinstance(clauses, list) or (key == "include" and not clauses):
            bad(f"'{key}' must be a {'non-empty ' if key == 'include' else ''}list of clauses, got {clauses!r}")
        for k, clause in enumerate(clauses):
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
                bad(f"{key}[{k}] needs a string 'class', got {clause!r}")
            count = clause.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                bad(f"{key}[{k}] 'count' must be an integer >= 1, got {count!r}")
            if "color" in clause and clause["color"] not in COLORS:
                bad(f"{key}[{k}] 'color' must be one of {COLORS}, got {clause['color']!r}")
            if "position" in clause:
                pos = clause["position"]
                if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                        and isinstance(pos[1], int) and not isinstance(pos[1], bool) and 0 <= pos[1] < k):
                    bad(f"{key}[{k}] 'position' must be [one of {list(RELATIONS)}, the index of an earlier "
                        f"clause], got {pos!r}")


# ---------------------------------------------------------------------- OCR
def quoted_target(prompt):
    """The text an OCR prompt asks to render: its first double-quoted span."""
    match = re.search(r'"([^"]*)"', prompt)
    if match is None:
        raise ValueError(f'OCR reward: the prompt has no double-quoted text to render: {prompt!r}')
    return match.group(1)


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognised, target):
    """Flow-GRPO's OCR reward of one image, in [0, 1]; case and spaces are ignored."""
    recognised, target = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not target:
        raise ValueError("OCR reward: the quoted target text is empty")
    # d = 0 if y is a substring of the recognised text, else Levenshtein(text, y), capped at |y|
    distance = 0 if target in recognised else min(levenshtein(recognised, target), len(target))
    # r = 1 - d / |y|
    return 1 - distance / len(target)
