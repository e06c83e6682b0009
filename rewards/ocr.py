"""The OCR reward (paper section 10): s = 1 - min(d, |y|) / |y|, y = the prompt's first "quoted" span,
d = 0 if y is in the recognised text, else the Levenshtein distance (rules.ocr_score).

Options: engine ("auto": PaddleOCR if installed, else EasyOCR | "paddleocr" | "easyocr") or reader (a
callable: H x W x 3 uint8 array -> str). PaddleOCR: pip install -r requirements-rewards.txt.

Departure: a prompt without a double-quoted span raises ValueError, checked in every prompt file before
anything loads (Flow-GRPO: IndexError mid-run); OCR errors propagate instead of scoring 0; Levenshtein
is computed in rules.py (python-Levenshtein is not a dependency). The engine is PaddleOCR 2.x as in
Flow-GRPO, at 2.10.0 (Flow-GRPO: 2.9.1, which needs numpy < 2; the same API); EasyOCR is accepted where
PaddleOCR is not installed, and its scores are not the paper's.
"""
from __future__ import annotations

from plumbing.model_files import hub_offline
from rewards.registry import as_scores, importable, register, uint8_images
from rewards.rules import ocr_score, quoted_target

OCR_ENGINES = ("paddleocr", "easyocr")  # "auto" takes the first installed: PaddleOCR is the paper's (Flow-GRPO's)
OCR_INSTALL = "pip install -r requirements-rewards.txt (PaddleOCR, the paper's engine), or pip install easyocr"


def _ocr_engines(engine: str) -> list[str]:
    """The installed engines that `engine` ("auto" or a name) may use, in OCR_ENGINES' order."""
    return [name for name in OCR_ENGINES if engine in ("auto", name) and importable(name)]


def _ocr_reader(engine, device):
    """A callable: (H, W, 3) uint8 RGB array -> all recognised text."""
    if engine not in ("auto", *OCR_ENGINES):
        raise ValueError(f"ocr engine must be auto, paddleocr or easyocr: {engine!r}")
    available = _ocr_engines(engine)
    if not available:
        raise ImportError(f"ocr reward (engine={engine!r}) needs an OCR engine: {OCR_INSTALL}, "
                          "or pass reader=callable(image uint8 HxWx3) -> str")
    if available[0] == "easyocr":
        import easyocr
        # with HF_HUB_OFFLINE (and in check_spec's build) its detector and recogniser are not downloaded
        reader = easyocr.Reader(["en"], gpu=device.type == "cuda", verbose=False, download_enabled=not hub_offline())
        return lambda image: "".join(reader.readtext(image, detail=0))
    from paddleocr import PaddleOCR  # the 2.x API that Flow-GRPO uses
    paddle = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=device.type == "cuda", show_log=False)
    return lambda image: "".join(line[1][0] for line in (paddle.ocr(image, cls=False)[0] or []))


def _check_ocr(engine="auto", reader=None):
    if reader is None and not _ocr_engines(engine):
        raise ImportError(f"ocr reward (engine={engine!r}) needs an OCR engine: {OCR_INSTALL}")
    return [f"OCR engine {engine}" if reader is None else "OCR reader given"]


def _needs_quoted_target(prompt: str, where: str) -> None:
    try:
        quoted_target(prompt)
    except ValueError:
        raise ValueError(f"{where}: {prompt!r} has no double-quoted text, which the ocr reward reads as the "
                         "target: quote it, or drop the prompt") from None


@register("ocr", check=_check_ocr, models={"OCR engine (text detector + recogniser)": 25_000_000}, prompt_rule=_needs_quoted_target)
def _ocr(device, dtype, engine="auto", reader=None):
    read = reader if reader is not None else _ocr_reader(engine, device)

    def ocr(images, prompts, metadata):
        arrays = uint8_images(images, prompts, metadata)
        return as_scores([ocr_score(read(array), quoted_target(prompt))
                        for array, prompt in zip(arrays, prompts)]), {}
    return ocr
