"""The GenEval reward (paper section 10): rules.py's GenEval rules on Mask2Former detections and CLIP
ViT-L/14 colours. s = Flow-GRPO's partial credit; info["strict"] = GenEval's own accuracy (every clause,
at least n objects), the number the paper reports.

Options: detector (GENEVAL_DETECTOR, facebook/mask2former-swin-small-coco-instance), clip_model
(CLIP_MODEL), threshold 0.3, counting_threshold 0.9, max_objects 16, position_margin 0.1.

Departures from GenEval / Flow-GRPO, with reasons:
 1. Detector: the transformers Mask2Former (facebook/mask2former-swin-small-coco-instance, its own
    384 px preprocessing) instead of mmdet's checkpoint at 1333x800, so no mmdet/mmcv. Boxes come from
    masks as in mmdet (mask2bbox); no NMS (GenEval's default max_overlap=1 disables it). Its COCO names
    "mouse", "remote", "keyboard" are renamed to GenEval's "computer mouse", "tv remote", "computer
    keyboard". Scores can differ slightly from the official GenEval numbers (docs/sd35.md says which
    path gives them: the mmdetection reward server through the http reward, or GenEval's own scripts).
 2. Colours: transformers' openai/clip-vit-large-patch14 (the weights of open_clip ViT-L-14 "openai")
    with its processor, instead of open_clip's transform.
 3. Mask2Former's training loss needs scipy (Hungarian matching); inference does not, and scipy is not
    a dependency, so its import check is bypassed while the detector is built (_without_scipy_check).
 4. Partial credit follows Flow-GRPO's evaluate_reward (reward-server/gen_eval.py) except that a failed
    relation adds one 0 clause (Flow-GRPO appends 0 and then 1 for it, a bug). Like Flow-GRPO it ignores
    "exclude" and is not clamped: 3 cats for "a cat" give 1 - |1 - 3| / 1 = -1.
 5. info["strict"] is GenEval's own rule (evaluate_images.py: at least n objects, exclude clauses), not
    Flow-GRPO's exact-count "strict_rewards".
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from PIL import Image

from rewards.registry import as_scores, hub_kwargs, hub_status, importable, pil_images, register, setting
from rewards.clip import CLIP_L14, check_clip, clip_image_embeddings, clip_text_embeddings, load_clip
from rewards.rules import COLORS, _kept_objects, geneval_score

COLOR_TEMPLATES = ["a photo of a {color} {name}", "a photo of a {color}-colored {name}",
                   "a photo of a {color} object"]
_COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def _object_crop(image, box, mask):
    """GenEval's colour input: the object's pixels over a flat #999 background, cropped to its box."""
    if mask is not None:
        background = Image.new("RGB", image.size, "#999")
        image = Image.composite(image, background, Image.fromarray(mask.cpu().numpy().astype(bool)))
    return image.crop(tuple(int(round(float(v))) for v in box))


def _classify_colors(clip, clip_processor, crops, name, classifiers):
    """CLIP zero-shot colour of each crop (GenEval via clip_benchmark); classifiers caches per class."""
    if not crops:
        return []
    if name not in classifiers:
        texts = [template.format(color=color, name=name) for color in COLORS for template in COLOR_TEMPLATES]
        # w_c = normalise(mean_t normalise(text_emb(template_t(c))))   (10, D)
        per_template = clip_text_embeddings(clip, clip_processor, texts)
        per_template = per_template.view(len(COLORS), len(COLOR_TEMPLATES), -1)
        classifiers[name] = F.normalize(per_template.mean(1), dim=-1)
    image = clip_image_embeddings(clip, clip_processor, crops)  # (N, D)
    return [COLORS[i] for i in (image @ classifiers[name].T).argmax(-1).tolist()]


def _mask_box(mask):
    """(x1, y1, x2, y2) of a binary (H, W) mask, x2/y2 one past the last pixel (mmdet's mask2bbox)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)


@contextmanager
def _without_scipy_check():
    """Build Mask2Former without scipy: only its training loss's matcher needs it (departure 3)."""
    from transformers.models.mask2former import modeling_mask2former
    if importable("scipy"):
        yield
        return
    check = modeling_mask2former.requires_backends
    modeling_mask2former.requires_backends = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_mask2former.requires_backends = check


def _check_geneval(detector=None, clip_model=None, **rules):
    return [hub_status(setting(detector, "GENEVAL_DETECTOR", "facebook/mask2former-swin-small-coco-instance"),
                       "GenEval detector"), *check_clip(clip_model)]


@register("geneval", check=_check_geneval, models={"facebook/mask2former-swin-small-coco-instance": 69_000_000, CLIP_L14: 427_600_000})
def _geneval(device, dtype, detector=None, clip_model=None, threshold=0.3, counting_threshold=0.9,
             max_objects=16, position_margin=0.1):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
    detector = setting(detector, "GENEVAL_DETECTOR", "facebook/mask2former-swin-small-coco-instance")
    processor = AutoImageProcessor.from_pretrained(detector, **hub_kwargs())
    with _without_scipy_check():
        model = Mask2FormerForUniversalSegmentation.from_pretrained(detector, dtype=dtype, **hub_kwargs())
    model = model.to(device).eval().requires_grad_(False)
    names = {i: _COCO_TO_GENEVAL.get(label, label) for i, label in model.config.id2label.items()}
    clip, clip_processor = load_clip(setting(clip_model, "CLIP_MODEL", CLIP_L14), device, dtype)
    classifiers = {}
    rules = dict(threshold=threshold, counting_threshold=counting_threshold, max_objects=max_objects)

    @torch.no_grad()
    def geneval(images, prompts, metadata):
        pils = pil_images(images, prompts, metadata)
        pixels = processor(images=pils, return_tensors="pt").pixel_values
        outputs = model(pixel_values=pixels.to(device, dtype))
        outputs.class_queries_logits = outputs.class_queries_logits.float()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float()
        results = processor.post_process_instance_segmentation(
            outputs, threshold=min(threshold, counting_threshold),
            target_sizes=[pil.size[::-1] for pil in pils], return_binary_maps=True)
        partial, strict = [], []
        for pil, result, meta in zip(pils, results, metadata):
            # with no segment, "segmentation" is a (H, W) map and zip() stops at the empty segments_info
            detections = [{"class": names[segment["label_id"]], "score": segment["score"],
                           "mask": mask.bool(), "box": _mask_box(mask), "color": None}
                          for segment, mask in zip(result["segments_info"], result["segmentation"])]
            kept = _kept_objects(detections, meta.get("tag"), **rules)
            for clause in meta.get("include", []):
                if "color" in clause:
                    found = kept.get(clause["class"], [])[:clause["count"]]
                    crops = [_object_crop(pil, d["box"], d["mask"]) for d in found]
                    colors = _classify_colors(clip, clip_processor, crops, clause["class"], classifiers)
                    for detection, color in zip(found, colors):
                        detection["color"] = color
            credit, correct = geneval_score(detections, meta, position_margin=position_margin, **rules)
            partial.append(credit)
            strict.append(float(correct))
        return as_scores(partial), {"strict": as_scores(strict)}
    return geneval
