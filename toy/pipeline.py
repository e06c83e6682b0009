"""A tiny SD3-architecture pipeline built in memory: the real diffusers/transformers classes at toy
widths, with character-level tokenizers, so that nothing is downloaded.

Used by the toy world's pretraining (toy/pretrain.py builds the embedded base `models/toy-sd3` from
it), by the test suite (a random-weight pipeline saved to a temporary folder and loaded like
SD3.5-Medium) and by the benchmark's SD3.5-Medium stand-in (bench/opd_round.py --sd35m-random).

Run: a library.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def make_clip_tokenizer(max_len: int = 77):
    """A character-level CLIP tokenizer built in memory (byte alphabet, no merges)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer
    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    toks = ["<|startoftext|>", "<|endoftext|>"] + alpha + [a + "</w>" for a in alpha]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(toks)}, merges=[], model_max_length=max_len)


def make_t5_tokenizer(words=(), max_len: int = 32, pieces=()):
    """A unigram T5 tokenizer built in memory: whole `words` win over the single characters, and so
    do the extra `pieces` (taken as they are: "\u2581" marks a piece that starts a word)."""
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-"]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    vocab += [(p, -1.0) for p in pieces if p not in {v for v, _ in vocab}]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_len)


@dataclass
class TinySD3Config:
    """Sizes of a tiny SD3-architecture pipeline (the real model's classes, tiny widths)."""
    image_size: int = 32            # pixels
    vae_channels: tuple = (32, 64)  # len 2 -> VAE factor 2
    latent_channels: int = 8
    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    text_dim: int = 32              # T5 d_model == joint_attention_dim
    clip_dim: int = 16              # each CLIP hidden size; 2 * clip_dim <= text_dim
    clip_max_len: int = 77
    t5_max_len: int = 32
    words: tuple = ("a", "the", "photo", "of", "red", "blue", "cat", "dog")
    pieces: tuple = ()                  # extra T5 pieces (make_t5_tokenizer), e.g. slot-bound glyphs
    dual_attention_layers: tuple = ()   # SD3.5's MMDiT-X blocks (a second, image-only attention): their indices
    qk_norm: str | None = None          # SD3.5's "rms_norm" of queries and keys; None as SD3


def build_tiny_pipeline(cfg: TinySD3Config = TinySD3Config(), seed: int = 0):
    """An SD3 pipeline with random weights and in-memory tokenizers: no download, runs on CPU.

    Dimension rules (diffusers and transformers check them at build time): caption_projection_dim =
    heads * head_dim;
    2 * clip_dim <= text_dim = joint_attention_dim; the two CLIP projections add up to
    pooled_projection_dim; CLIP eos_token_id equals the tokenizer's end token; VAE shift_factor set.
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    assert 2 * cfg.clip_dim <= cfg.text_dim, "CLIP hidden sizes added together must fit joint_attention_dim"
    torch.manual_seed(seed)
    factor = 2 ** (len(cfg.vae_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.image_size // factor, patch_size=2, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_dim,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=4 * cfg.clip_dim,
        pos_embed_max_size=cfg.image_size // factor, dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm=cfg.qk_norm)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0)
    clips = []
    for _ in range(2):
        tok = make_clip_tokenizer(cfg.clip_max_len)
        clips.append((tok, CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=cfg.clip_dim, intermediate_size=2 * cfg.clip_dim,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=2 * cfg.clip_dim,
            max_position_embeddings=cfg.clip_max_len, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act="gelu"))))
    t5_tok = make_t5_tokenizer(cfg.words, cfg.t5_max_len, cfg.pieces)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=cfg.text_dim, d_kv=cfg.text_dim // 4,
                                 d_ff=2 * cfg.text_dim, num_layers=2, num_heads=4, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clips[0][1], tokenizer=clips[0][0], text_encoder_2=clips[1][1], tokenizer_2=clips[1][0],
        text_encoder_3=t5, tokenizer_3=t5_tok)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return pipe
