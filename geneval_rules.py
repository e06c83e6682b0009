"""GenEval's scoring rules (github.com/djghosh13/geneval, evaluation/evaluate_images.py), on detections.

`geneval_score(detections, metadata)` -> (Flow-GRPO's partial credit, GenEval's strict all-clauses
accuracy) for one image, from detections {"class", "color", "box", "score"}. Two detectors feed it:
rewards.py's Mask2Former + CLIP colour reward (`geneval`) and toy/world.py's pixel detector (`toy_geneval`).
Paper section 10: thresholds 0.3 (0.9 for counting), at most 16 objects, position margin 0.1; a count
clause earns 1 - |n_req - n_found| / n_req.
"""
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
