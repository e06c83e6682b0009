"""A random-weight SD3.5-Medium pipeline folder built from its configuration alone (no download), for the
real-size GPU smoke runs of bench/gpu_check.sh: every component from tests/fixtures/sd35m_config at its
published size (transformer 2.5 B, T5-XXL 4.8 B, CLIP-L, CLIP-G, VAE), with random weights initialised
where they will run (fast on a GPU) in the dtype they run in, and in-memory tokenizers (toy/pipeline.py:
byte-level CLIP, a small T5 vocabulary) whose ids the real embedding tables hold. It samples noise, and
costs exactly what SD3.5-M costs: same shapes, same memory, same FLOPs.

`--layers N` keeps N blocks of each network (the CPU test of this builder); the default is the real depth.

Run:
    python -m bench.sd35m_folder --out /tmp/sd35m-random --device cuda      # ~15 GB on disk, bfloat16
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sd35m_config"


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((FIXTURE / name / "config.json").read_text()).items() if not k.startswith("_")}


def build(out: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, layers: int | None = None) -> str:
    """Write the random-weight pipeline folder `out`; returns it."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from toy.pipeline import make_clip_tokenizer, make_t5_tokenizer
    tr = _config("transformer")
    t5, clip_l, clip_g = _config("text_encoder_3"), _config("text_encoder"), _config("text_encoder_2")
    if layers:
        tr.update(num_layers=layers, dual_attention_layers=[i for i in tr["dual_attention_layers"] if i < layers])
        t5.update(num_layers=layers)
        clip_l.update(num_hidden_layers=layers)
        clip_g.update(num_hidden_layers=layers)
    clip_tok = make_clip_tokenizer(77)
    t5_tok = make_t5_tokenizer(("a", "photo", "of", "cat", "sign", "that", "says"),
                               json.loads((FIXTURE / "tokenizer_3" / "tokenizer_config.json").read_text())["model_max_length"])
    ids = {"bos_token_id": clip_tok.bos_token_id, "eos_token_id": clip_tok.eos_token_id,
           "pad_token_id": clip_tok.pad_token_id}  # pooling finds the tokenizer's end token
    torch.manual_seed(0)
    with torch.device(device):
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel.from_config(tr).to(dtype),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(FIXTURE, subfolder="scheduler"),
            vae=AutoencoderKL.from_config(_config("vae")),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**{**clip_l, **ids})).to(dtype),
            tokenizer=clip_tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**{**clip_g, **ids})).to(dtype),
            tokenizer_2=make_clip_tokenizer(77),
            text_encoder_3=T5EncoderModel(T5Config(**{**t5, "pad_token_id": 0, "eos_token_id": 1})).to(dtype),
            tokenizer_3=t5_tok)
    pipe.save_pretrained(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="A random-weight SD3.5-Medium pipeline folder from its configs.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=None, help="blocks per network (default: the real depth)")
    args = ap.parse_args(argv)
    print(f"wrote {build(args.out, args.device, getattr(torch, args.dtype), args.layers)}")


if __name__ == "__main__":
    main()
