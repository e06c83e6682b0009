"""DDPO's JPEG rewards: s = +/- the image's JPEG size in kB at quality 95.

Departure: DDPO's units (kB, negated for compressibility); Flow-GRPO divides the compressibility by 500.
"""
from __future__ import annotations

from rewards.registry import as_scores, jpeg_bytes, pil_images, register

def _jpeg_kilobytes(images, prompts, metadata):
    return as_scores([len(jpeg_bytes(pil, quality=95)) / 1000 for pil in pil_images(images, prompts, metadata)])


@register("jpeg_incompressibility")
def _jpeg_incompressibility(device, dtype):
    return lambda images, prompts, metadata: (_jpeg_kilobytes(images, prompts, metadata), {})


@register("jpeg_compressibility")
def _jpeg_compressibility(device, dtype):
    return lambda images, prompts, metadata: (-_jpeg_kilobytes(images, prompts, metadata), {})
