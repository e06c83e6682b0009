"""The flow-matching model wrapper: an SD3-family pipeline reduced to what the algorithms need.

Implements the model side of paper sections 2 and 7: prompt encoding, the classifier-free-guided
velocity v(x_t, t, c), decoding latents to images, and LoRA adapters on ONE shared backbone (a
trainable student, frozen teachers switched per call, and the base model as reference).

Time convention (stated once, here; every other file follows it)
-----------------------------------------------------------------
    t = 1 is pure noise, t = 0 is data;   x_t = (1 - t) x_0 + t eps,   eps ~ N(0, I)
    the network predicts the velocity     v(x_t, t, c) ~ eps - x_0     (so dx/dt = v)
    the sampler integrates dx/dt = v from t = 1 down to t = 0.
The SD3 transformer takes `timestep = 1000 t`. Latents x live in VAE space:
    x = (vae.encode(image).mean - shift_factor) * scaling_factor      (images in [-1, 1])

Departures from the reference code (Flow-GRPO / DiffusionOPD release)
---------------------------------------------------------------------
1. Adapters are managed on the diffusers transformer directly (`add_adapter`/`set_adapter`), not
   through a `PeftModel` wrapper, so the student, every teacher and the adapter-free base share
   one copy of the base weights and one forward function.
2. Saved LoRA folders hold BOTH the PEFT layout (adapter_config.json + adapter_model.safetensors,
   keys `base_model.model.<module>.lora_A.weight`, the format Flow-GRPO and the DiffusionOPD
   authors release, loadable with `PeftModel.from_pretrained`) and the diffusers layout
   (pytorch_lora_weights.safetensors, loadable with `pipe.load_lora_weights(folder)`).
3. The uncond/cond CFG pair always runs as one batched forward; scale 1 runs the cond half only.

Run: this file is a library; `python sample.py --help` samples from a model.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from plumbing.model_files import (DIFFUSERS_WEIGHTS, MAX_SEQUENCE_LENGTH, PEFT_WEIGHTS, TEXT_ENCODERS,
                                   check_lora_fits, check_lora_folder, check_model_path, check_resolution,
                                   hub_offline, portable_path, repo_path, sort_safetensors_metadata,
                                   stored_fingerprint, weights_digest, weights_fingerprint)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The 8 attention projections of the released recipe (paper section 7).
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
STUDENT = "student"                        # the trainable adapter's name


@dataclass
class TextEmbeds:
    """Encoded prompts: the joint-attention sequence and the pooled vector of SD3."""
    seq: torch.Tensor     # (B, L, joint_attention_dim)
    pooled: torch.Tensor  # (B, pooled_projection_dim)

    def __getitem__(self, idx) -> "TextEmbeds":
        return TextEmbeds(self.seq[idx], self.pooled[idx])

    def __len__(self) -> int:
        return self.seq.shape[0]

    @staticmethod
    def cat(items: list["TextEmbeds"]) -> "TextEmbeds":
        return TextEmbeds(torch.cat([e.seq for e in items]), torch.cat([e.pooled for e in items]))





def _add_adapter(transformer, cfg, name: str) -> None:
    """transformer.add_adapter without PEFT's warning that the model already has a peft_config: several
    adapters on one backbone (student, teachers, NFT's old policy) is this project's design."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
        transformer.add_adapter(cfg, adapter_name=name)




class FlowModel:
    """An SD3 pipeline seen as a velocity field with switchable LoRA adapters.

    `velocity(x, t, embeds, guidance)` is the only network call the algorithms make; which weights
    answer it is chosen by `with model.adapter(name):` (None = base model, adapters disabled).
    """

    def __init__(self, pipe, device="cpu", dtype=torch.float32, max_sequence_length=None, name="model"):
        from diffusers import SD3Transformer2DModel
        if not isinstance(pipe.transformer, SD3Transformer2DModel):
            raise ValueError(f"{name}: transformer is {type(pipe.transformer).__name__}, "
                             "expected SD3Transformer2DModel")
        self.pipe, self.name, self.device, self.dtype = pipe, name, torch.device(device), dtype
        self.transformer, self.vae = pipe.transformer, pipe.vae
        t5_max = pipe.tokenizer_3.model_max_length if pipe.tokenizer_3 is not None else MAX_SEQUENCE_LENGTH
        self.max_sequence_length = max_sequence_length or min(MAX_SEQUENCE_LENGTH, t5_max)
        pipe.set_progress_bar_config(disable=True)
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.requires_grad_(False).eval()  # models built from configs start in train mode
        if self.device.type == "cuda":  # what stays float32 (the VAE, LoRA math) runs its matmuls in TF32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._neg: TextEmbeds | None = None
        self._full_finetune = False
        self._encoders_offloaded = False
        # _frozen holds the base and the teacher adapters (the live transformer itself, unless full
        # fine-tuning made it the student); _active is the module `velocity` calls.
        self._frozen = self._active = self.transformer
        self._fingerprint = None
        self.base_weights: dict | None = None  # weights_digest of the folder it was loaded from (load())
        if self.transformer.dtype != dtype:  # a pipeline built in memory: cast here (load() casts on reading)
            self.fingerprint()  # of the stored weights: the same base in any dtype has one fingerprint
            self.transformer.to(dtype)
            for name in TEXT_ENCODERS:
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to(dtype)
        # the transformer and the text encoders run in `dtype`; the VAE in float32, as Flow-GRPO (ac4c86e)
        # and NVlabs' DiffusionNFT run it
        pipe.to(self.device)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, device="cpu", dtype=torch.float32, max_sequence_length=None) -> "FlowModel":
        """Load an SD3-family pipeline from a local folder or a hub id (offline-safe), each weight read
        directly in the dtype it runs in (transformer and text encoders `dtype`, VAE float32): no
        float32 copy of a bfloat16 run on the host. A relative path that is not under the working
        directory is looked up in the repository (`repo_path`)."""
        check_model_path(path)
        from diffusers import StableDiffusion3Pipeline
        from diffusers.utils import logging as diffusers_logging
        local = repo_path(path)
        local_only = Path(local).is_dir() or hub_offline()
        bar = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bar per process
        try:
            dtypes = {"default": torch.float32, "transformer": dtype, **{n: dtype for n in TEXT_ENCODERS}}
            pipe = StableDiffusion3Pipeline.from_pretrained(local, dtype=dtypes, local_files_only=local_only)
        finally:
            if bar:
                diffusers_logging.enable_progress_bar()
        model = cls(pipe, device, dtype, max_sequence_length, name=path)
        model._fingerprint = stored_fingerprint(pipe.transformer)
        model.base_weights = weights_digest(path)  # every component's stored weights, saved with adapters
        model.path = portable_path(path)  # what saved adapters name as their base
        return model

    def offload_text_encoders(self) -> None:
        """Keep the text encoders in host memory between prompt encodings (the memory plan's choice when
        a GPU cannot hold them beside training: T5-XXL alone is 9.5 GB in bfloat16); encode_prompts
        brings them to the device for each call."""
        self._encoders_offloaded = True
        self._text_encoders_to("cpu")

    def _text_encoders_to(self, device) -> None:
        for name in TEXT_ENCODERS:
            if getattr(self.pipe, name, None) is not None:
                getattr(self.pipe, name).to(device)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell; a resolution must be divisible by this times the patch size."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image size, with a clear error for bad sizes."""
        divisor = self.vae_scale * self.transformer.config.patch_size
        check_resolution(height, width, divisor, (self.transformer.config.pos_embed_max_size or 10**6) * divisor)
        return (self.transformer.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    def default_resolution(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEmbeds:
        """Encode prompts with the three SD3 text encoders (no CFG pair; see `negative`)."""
        if self._encoders_offloaded:
            self._text_encoders_to(self.device)
        try:
            seq, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        finally:
            if self._encoders_offloaded:
                self._text_encoders_to("cpu")
        return TextEmbeds(seq.to(self.dtype), pooled.to(self.dtype))

    def negative(self, batch: int) -> TextEmbeds:
        """The empty negative prompt "", encoded once and cached, expanded to `batch` rows."""
        if self._neg is None:
            self._neg = self.encode_prompts([""])
        return TextEmbeds(self._neg.seq.expand(batch, -1, -1), self._neg.pooled.expand(batch, -1))

    # ------------------------------------------------------------------ the velocity field
    def velocity(self, x: torch.Tensor, t: torch.Tensor, embeds: TextEmbeds, guidance: float,
                 detach_uncond: bool = False) -> torch.Tensor:
        """Guided velocity  v = v_u + w (v_c - v_u)  (paper section 2), uncond and cond in one forward.

        x: (B, C, h, w) latents; t: scalar or (B,) times in [0, 1]; embeds: B prompts. w = 1 runs
        the conditional half only. Differentiable: call under torch.no_grad() for rollouts.
        detach_uncond: v = sg(v_u) + w (v_c - sg(v_u)), the training forward of Flow-GRPO up to its commit
        ac4c86e (section 8a; an ablation here): the gradient is w grad v_c; v_u then runs in its own
        forward without a graph (half the backward). Default: both branches carry gradient.
        """
        B = x.shape[0]
        if len(embeds) != B:
            raise ValueError(f"{len(embeds)} prompt embeddings for {B} latents")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(B)
        if guidance == 1.0:
            return self._forward(x, t, embeds)
        if detach_uncond and torch.is_grad_enabled():
            with torch.no_grad():
                v_uncond = self._forward(x, t, self.negative(B))
            return v_uncond + guidance * (self._forward(x, t, embeds) - v_uncond)
        both = TextEmbeds.cat([self.negative(B), embeds])
        v_uncond, v_cond = self._forward(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    def _forward(self, x, t, embeds: TextEmbeds) -> torch.Tensor:
        out = self._active(hidden_states=x.to(self.dtype), timestep=1000.0 * t,
                               encoder_hidden_states=embeds.seq, pooled_projections=embeds.pooled,
                               return_dict=False)[0]
        return out.to(x.dtype)

    # ------------------------------------------------------------------ pixels <-> latents
    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
        cfg = self.vae.config
        z = x.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        return (self.vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (B, C, h, w), using the posterior mean."""
        cfg = self.vae.config
        z = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist.mean
        return ((z - cfg.shift_factor) * cfg.scaling_factor).float()

    # ------------------------------------------------------------------ adapters
    def add_student_lora(self, rank=32, alpha=64, targets=LORA_TARGETS, init="gaussian", seed=0):
        """Attach a fresh trainable LoRA (paper section 7: r 32, alpha 64, gaussian init)."""
        from peft import LoraConfig
        cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _add_adapter(self.transformer, cfg, STUDENT)
        self._cast_lora(STUDENT)
        self.transformer.set_adapter(STUDENT)
        return self.trainable_parameters()

    def add_frozen_copy(self, name: str) -> list[torch.nn.Parameter]:
        """A second, frozen LoRA adapter `name` holding a copy of the student's weights (DiffusionNFT's
        "old" policy, paper section 8c). Returns its parameters, ordered like trainable_parameters()."""
        import copy
        if self._full_finetune:
            raise ValueError("a frozen copy of the student is a LoRA adapter: "
                             "not available with --full_finetune")
        cfg = copy.deepcopy(self.transformer.peft_config[STUDENT])
        cfg.inference_mode = True
        _add_adapter(self.transformer, cfg, name)
        self._cast_lora(name)
        named = dict(self.transformer.named_parameters())
        copies = []
        with torch.no_grad():
            for n, p in self.transformer.named_parameters():
                if f".{STUDENT}." in n:
                    q = named[n.replace(f".{STUDENT}.", f".{name}.")]
                    q.copy_(p).requires_grad_(False)
                    copies.append(q)
        self.transformer.set_adapter(STUDENT)
        self.trainable_parameters()  # set_adapter toggles requires_grad: the student stays trainable
        return copies

    def compile_blocks(self) -> None:
        """torch.compile every transformer block in place (regional compilation): quick to compile,
        one graph per block kind x adapter x grad mode x batch shape, and adapters still switch."""
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        for tr in {id(t): t for t in (self.transformer, self._frozen)}.values():
            for block in tr.transformer_blocks:
                block.compile()

    def enable_full_finetune(self):
        """Train every transformer weight instead of a LoRA; base and teachers move to a frozen copy."""
        import copy
        assert not self.has_adapter(STUDENT), "full fine-tuning replaces the student LoRA; not both"
        self._frozen = copy.deepcopy(self.transformer).requires_grad_(False)
        self.transformer.requires_grad_(True)
        self._full_finetune = True
        return self.trainable_parameters()

    def transformers(self) -> list[torch.nn.Module]:
        """Every transformer module `velocity` may call: the live one, and with full fine-tuning also
        the frozen copy that holds the base and the teachers."""
        return [self.transformer] + ([self._frozen] if self._frozen is not self.transformer else [])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Only the student's weights: the student LoRA, or every transformer weight when full FT."""
        if self._full_finetune:
            return list(self.transformer.parameters())
        params = [p for n, p in self.transformer.named_parameters() if f".{STUDENT}." in n]
        assert params, "no student adapter: call add_student_lora() or enable_full_finetune() first"
        for p in params:
            p.requires_grad_(True)
        return params

    def load_lora(self, folder: str, name: str, trainable=False, dtype: torch.dtype | None = None) -> dict:
        """Load a PEFT LoRA folder (this project's, Flow-GRPO's or DiffusionOPD's) as adapter `name`.

        Checks the target modules exist and every LoRA shape matches this base before loading.
        Returns the adapter's config dict.
        """
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file
        check_lora_folder(folder)
        folder_p = Path(folder)
        cfg = LoraConfig.from_pretrained(folder)
        state = {k.removeprefix("base_model.model."): v
                 for k, v in load_file(folder_p / PEFT_WEIGHTS).items()}
        tr = self.transformer if name == STUDENT else self._frozen
        check_lora_fits(folder, state, dict(tr.named_modules()), self.name)  # finite, its modules, its shapes
        cfg.inference_mode = not trainable
        _add_adapter(tr, cfg, name)
        result = set_peft_model_state_dict(tr, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k]
        assert not missing and not result.unexpected_keys, \
            f"LoRA {folder!r} did not load fully: {missing[:3]} {result.unexpected_keys[:3]}"
        self._cast_lora(name, tr, None if trainable else dtype)
        for n, p in tr.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(trainable)
        tr.set_adapter(STUDENT if self.has_adapter(STUDENT) else name)
        return cfg.to_dict()

    def has_adapter(self, name: str) -> bool:
        tr = self.transformer if name == STUDENT else self._frozen
        return name in getattr(tr, "peft_config", {})

    def _cast_lora(self, name, tr=None, dtype: torch.dtype | None = None):
        # LoRA weights train in float32 even when the backbone runs in half precision (in float64 with a
        # float64 backbone, as the tests' references do); a frozen adapter may take the backbone's dtype
        # (opd.py --teacher_dtype).
        dtype = dtype or (torch.float64 if self.dtype == torch.float64 else torch.float32)
        for n, p in (tr or self.transformer).named_parameters():
            if f".{name}." in n:
                p.data = p.data.to(dtype)

    def _lora_layers(self, tr) -> tuple[list, list[torch.nn.Parameter]]:
        """(peft's adapter layers of transformer `tr`, all their adapter weights), cached per set of adapters
        (walking the whole module tree and its peft checks on every switch costs milliseconds)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        key = (id(tr), tuple(getattr(tr, "peft_config", {})))
        if getattr(self, "_layer_cache", (None,))[0] != key:
            layers = [m for m in tr.modules() if isinstance(m, BaseTunerLayer)]
            params = [p for m in layers for name in m.adapter_layer_names
                      for p in getattr(m, name).parameters()]
            self._layer_cache = (key, layers, params)
        return self._layer_cache[1], self._layer_cache[2]

    @contextlib.contextmanager
    def adapter(self, name: str | None):
        """Route `velocity` through adapter `name`, or through the plain base model for None.

        Switching does not change which parameters are trainable: the student's weights keep
        requires_grad, and a teacher's forward simply never touches them. With full fine-tuning
        the student is the live transformer and the base and teachers live on a frozen copy.
        """
        if self._full_finetune and name == STUDENT:
            yield
            return
        tr = self._frozen
        if name is not None and not self.has_adapter(name):
            raise KeyError(f"no adapter {name!r}; loaded: {sorted(getattr(tr, 'peft_config', {}))}")
        layers, params = self._lora_layers(tr)
        trainable = [p for p in params if p.requires_grad]  # only adapter weights change requires_grad here
        for layer in layers:  # what diffusers' disable_adapters / set_adapter do, layer by layer
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name)
                layer.enable_adapters(True)
        self._active = tr
        try:
            yield
        finally:
            self._active = self.transformer
            back = STUDENT if self.has_adapter(STUDENT) else \
                name or next(iter(getattr(tr, "peft_config", {})), None)
            for layer in layers:
                layer.set_adapter(back)
                layer.enable_adapters(True)
            for p in params:  # set_adapter toggles requires_grad; restore it
                p.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name (LoRA keys in PEFT layout, or the full transformer)."""
        if self._full_finetune:
            return {k: v.detach() for k, v in self.transformer.state_dict().items()}
        from peft import get_peft_model_state_dict
        return {f"base_model.model.{k}": v.detach()
                for k, v in get_peft_model_state_dict(self.transformer, adapter_name=STUDENT,
                                                      save_embedding_layers=False).items()}

    def save_student(self, folder: str, extra_config: dict | None = None) -> None:
        """Write the student as a PEFT folder that PeftModel and diffusers both load.

        `extra_config` (base model, task, dataset, guidance...) is saved as run_config.json for
        opd.py to read. Call from rank 0; callers make it atomic by writing to a temp folder.
        """
        from safetensors.torch import save_file
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in self.student_state_dict().items()}
        if self._full_finetune:
            self.transformer.save_pretrained(out / "transformer", safe_serialization=True)
        else:
            cfg = self.transformer.peft_config[STUDENT]
            cfg.base_model_name_or_path = getattr(self, "path", self.name)
            cfg.target_modules = sorted(cfg.target_modules)  # a set: its order changes per process
            cfg.save_pretrained(out)
            save_file(state, out / PEFT_WEIGHTS)
            # diffusers layout: keys "transformer.<module>.lora_A.weight", alpha kept as metadata
            from diffusers import StableDiffusion3Pipeline
            StableDiffusion3Pipeline.save_lora_weights(
                out,
                transformer_lora_layers={k.removeprefix("base_model.model."): v for k, v in state.items()},
                transformer_lora_adapter_metadata=cfg.to_dict(), weight_name=DIFFUSERS_WEIGHTS)
            sort_safetensors_metadata(out / DIFFUSERS_WEIGHTS)  # the same bytes in every process
        record = {"base_fingerprint": self.fingerprint(), "max_sequence_length": self.max_sequence_length}
        if self.base_weights:
            record["base_weights"] = self.base_weights
        (out / "run_config.json").write_text(json.dumps({**record, **(extra_config or {})}, indent=2))

    def fingerprint(self) -> str:
        """A short hash of the base transformer's config and first/last weights (identifies the base),
        of the weights as stored (in float32): the same base loaded in any dtype has one fingerprint."""
        if self._fingerprint is None:
            base = {n.replace(".base_layer", ""): p
                    for n, p in self._frozen.named_parameters() if "lora_" not in n}
            self._fingerprint = weights_fingerprint(self._frozen.config, lambda name: base[name], list(base))
        return self._fingerprint
