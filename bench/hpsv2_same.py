"""HPSv2.1 as rewards/preference.py builds it (open_clip_torch's ViT-H-14, its departure) against the hpsv2 package's
own copy of open_clip (Flow-GRPO's hpsv2_scorer.py route), on one set of ViT-H-14 weights.

HPSv2.1's real weights cannot be downloaded on the machine this was written on; random weights of the
real architecture stand in, the same tensors in both builds. Equal scores then mean the same
architecture, weight names, image preprocessing, tokenizer and score, so the real file scores the same
through either build. Prints the weights, the largest difference of the preprocessed pixels (HPSv2's
transform as rewards/preference.py writes it, and open_clip_torch's default transform, which differs), of the
tokens and of the scores.

Needs a venv with both packages, not the project's (hpsv2 pins pytest and protobuf below requirements.txt):
    python3 -m venv /tmp/hps
    /tmp/hps/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 hpsv2==1.2.0 pillow
    /tmp/hps/bin/python bench/hpsv2_same.py        # ~8 GB of memory, a few minutes on 2 CPU cores
The hpsv2 1.2.0 wheel lacks its tokenizer's vocabulary file (bpe_simple_vocab_16e6.txt.gz): the script
copies open_clip's into it first, as a user of that package must, and says so.
"""
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewards  # noqa: E402
from rewards import preference  # noqa: E402


def mend_hpsv2_vocabulary() -> None:
    """Copy open_clip's BPE vocabulary into the hpsv2 package when its wheel lacks it."""
    fork = Path(importlib.util.find_spec("hpsv2").submodule_search_locations[0]) / "src" / "open_clip"
    vocabulary = fork / "bpe_simple_vocab_16e6.txt.gz"
    if not vocabulary.exists():
        source = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / vocabulary.name
        shutil.copyfile(source, vocabulary)
        print(f"hpsv2's wheel lacks {vocabulary.name}: copied open_clip's into {fork}")


def main() -> None:
    mend_hpsv2_vocabulary()
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    torch.manual_seed(0)
    # Flow-GRPO's construction (hpsv2_scorer.py at 94e23ee) without the LAION download (pretrained=None):
    # HPSv2.1's weights replace every tensor of it anyway
    fork, _, fork_preprocess = create_model_and_transforms(
        "ViT-H-14", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    fork.eval()
    weights = fork.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "HPS_v2.1_stand-in.pt"
        torch.save({"state_dict": weights}, checkpoint)
        reward = rewards.load_reward("hpsv2", checkpoint=str(checkpoint))
    torch.manual_seed(1)
    images = torch.rand(4, 3, 512, 512)
    prompts = ["a photo of a cat", "two red cars on a street", 'a sign that says "hello world"',
               "an astronaut riding a horse, oil painting"]
    ours, _ = reward(images, prompts, [{}] * len(prompts))
    pils = rewards.registry.pil_images(images, prompts, [{}] * len(prompts))
    tokenizer = get_tokenizer("ViT-H-14")
    with torch.no_grad():
        outputs = fork(torch.stack([fork_preprocess(p) for p in pils]), tokenizer(prompts))
    theirs = torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)

    import open_clip
    fork_pixels = torch.stack([fork_preprocess(p) for p in pils])
    ours_pixels = preference.hps_pixels(images, prompts, [{}] * len(prompts), 224, open_clip.OPENAI_DATASET_MEAN,
                                     open_clip.OPENAI_DATASET_STD)
    _, _, open_clip_preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
    default = torch.stack([open_clip_preprocess(p) for p in pils])
    tokens = (open_clip.get_tokenizer("ViT-H-14")(prompts) != tokenizer(prompts)).sum().item()
    print(f"weights: {len(weights)} tensors, {sum(t.numel() for t in weights.values()) / 1e6:.1f} M parameters "
          "(loaded into open_clip_torch's ViT-H-14 with every key checked)")
    print(f"preprocessing (normalised pixels), largest difference to hpsv2's: preference.hps_pixels "
          f"{(ours_pixels - fork_pixels).abs().max().item():.2e}, open_clip_torch's own transform "
          f"{(default - fork_pixels).abs().max().item():.2e}; tokens differing {tokens}")
    print(f"scores hpsv2 package: {[round(v, 6) for v in theirs.tolist()]}")
    print(f"scores rewards/:      {[round(v, 6) for v in ours.tolist()]}")
    print(f"largest score difference {(ours - theirs).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
