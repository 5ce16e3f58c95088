"""The Anima family for the training engine: frozen AnimaModularPipeline components (Qwen3 text
encoder, the text conditioner / "LLM adapter", the Cosmos DiT, the Qwen-Image video VAE), a peft
LoRA on the DiT's blocks (and optionally on the LLM adapter), the flow-matching objective, sample
images, and export in the ComfyUI layout that ComfyUI, diffusion-pipe and this studio load.

Objective (rectified flow, as Anima was trained): x_t = (1 - s) * x0 + s * noise, the DiT predicts
noise - x0, and is given s itself as its timestep (the pipeline divides the scheduler's 0..1000
timesteps by 1000). x0 are VAE latents normalised per channel with the VAE's latents_mean /
latents_std, 5-D: (B, C, T=1, H, W).

Timestep sampling follows tdrussell/diffusion-pipe, models/anima.py (AnimaPipeline.prepare_inputs),
with timestep_sample_method = "logit_normal", sigmoid_scale = 1.0 and shift = 3.0: s = sigmoid(n),
n ~ N(0, 1), then s' = shift * s / (1 + (shift - 1) * s). (diffusion-pipe applies no shift unless its
`shift` option is set; 3.0 is the value chosen here. sd-scripts' Anima support was not read.)

The Qwen3 text encoder can be trained too (train_text_encoder): a LoRA on its attention and MLP
linears with text_encoder_lr; the LLM adapter has llm_adapter_lr. In the ComfyUI file the text
encoder's LoRA is named `text_encoders.qwen3_06b.transformer.model.<module>` - ComfyUI's generic
text-encoder LoRA names (`text_encoders.` + the key in its CLIP model's state dict), with the Anima
Qwen3 encoder held as `qwen3_06b` whose `transformer.model` is the Qwen3 model.
"""

from __future__ import annotations

from pathlib import Path

from studio.errors import ConfigError, JobStopped
from studio.training.config import TrainConfig
from studio.training.network import finish_network, trainable

TIMESTEP_SHIFT = 3.0  # diffusion-pipe's `shift` (see the module docstring)
SIGMOID_SCALE = 1.0  # diffusion-pipe's `sigmoid_scale` default
MAX_SEQUENCE_LENGTH = 512
VAE_SCALE = 8
_BLOCK = r"^transformer_blocks\.\d+\."
ATTENTION = _BLOCK + r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$"
ATTENTION_FF = _BLOCK + r"((attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)$"
ADAPTER_TARGETS = r"^blocks\.\d+\.((self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)|mlp\.0|mlp\.2)$"
TEXT_ENCODER_TARGETS = r"^layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))$"
TEXT_ENCODER_COMFY_PREFIX = "text_encoders.qwen3_06b.transformer.model."
EXPORTABLE = ("lora",)


def transformer_targets(target: str) -> str:
    return {"attention": ATTENTION, "attention_ff": ATTENTION_FF, "all": ATTENTION_FF}[target]


class AnimaTrainingModel:
    family = "anima"
    base_model_version = "anima"
    SAMPLE_SAMPLER = "Euler"  # what sample_images uses, by its Generate name (for the samples' infotext)
    validation_timesteps = (100, 300, 500, 700, 900)  # thousandths of sigma

    def __init__(self, pipe, config: TrainConfig, device, weight_dtype):
        import torch

        if config.network_type not in EXPORTABLE:
            raise ConfigError("Anima training supports LoRA networks only (network_type = \"lora\")")
        if config.v_parameterization or config.zero_terminal_snr:
            raise ConfigError("v_parameterization / zero_terminal_snr are SDXL settings; Anima uses flow matching")
        if config.min_snr_gamma:
            raise ConfigError("min_snr_gamma is for epsilon/v-prediction models; leave it unset for Anima")
        self.pipe, self.config, self.device, self.weight_dtype = pipe, config, device, weight_dtype
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.unet = self.transformer  # the engine's name for the denoiser
        self.text_encoder, self.text_conditioner = pipe.text_encoder, pipe.text_conditioner
        self.tokenizer, self.t5_tokenizer = pipe.tokenizer, pipe.t5_tokenizer
        self.noise_scheduler = pipe.scheduler
        self.train_adapter = config.train_llm_adapter
        self.train_text_encoder = config.train_text_encoder
        self.vae_dtype = torch.float32
        for module in (self.transformer, self.vae, self.text_encoder, self.text_conditioner):
            module.requires_grad_(False)
            module.eval()
        self.transformer.to(device, weight_dtype)
        self.text_encoder.to(device, weight_dtype)
        self.text_conditioner.to(device, weight_dtype)
        self.vae.to(device, self.vae_dtype)
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(z, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(z, 1, 1, 1)
        self.scaling_factor = 1.0  # normalisation is per channel: see scale_latents

    # -- the network ---------------------------------------------------------------------------
    def _lora_config(self, targets: str):
        from peft import LoraConfig

        return LoraConfig(r=self.config.network_dim, lora_alpha=self.config.network_alpha,
                          target_modules=targets, init_lora_weights=True)

    def add_network(self) -> list[dict]:
        import torch

        config = self.config
        torch.manual_seed(config.seed)
        self.transformer.add_adapter(self._lora_config(transformer_targets(config.network_target)))
        groups = [{"params": trainable(self.transformer), "lr": config.unet_lr or config.learning_rate}]
        if self.train_adapter:
            self.text_conditioner.add_adapter(self._lora_config(ADAPTER_TARGETS))
            self.text_conditioner.train()
            groups.append({"params": trainable(self.text_conditioner),
                           "lr": config.llm_adapter_lr or config.text_encoder_lr or config.learning_rate})
        if self.train_text_encoder:
            self.text_encoder.add_adapter(self._lora_config(TEXT_ENCODER_TARGETS))
            self.text_encoder.train()
            groups.append({"params": trainable(self.text_encoder),
                           "lr": config.text_encoder_lr or config.learning_rate})
        return finish_network(groups, self.transformer, config.gradient_checkpointing, config.fp8_base)

    def trainable_modules(self) -> list:
        return [self.transformer, *([self.text_conditioner] if self.train_adapter else []),
                *([self.text_encoder] if self.train_text_encoder else [])]

    def use_prepared(self, modules: list) -> None:
        modules = list(modules)
        if self.train_adapter and modules:
            self.text_conditioner = modules.pop(0)
        if self.train_text_encoder and modules:
            self.text_encoder = modules.pop(0)

    def network_state(self) -> dict[str, dict]:
        from peft.utils import get_peft_model_state_dict

        parts = {"transformer": get_peft_model_state_dict(self.transformer)}
        if self.train_adapter:
            parts["text_conditioner"] = get_peft_model_state_dict(_unwrap(self.text_conditioner))
        if self.train_text_encoder:
            parts["text_encoder"] = get_peft_model_state_dict(_unwrap(self.text_encoder))
        return parts

    def load_network_state(self, parts: dict[str, dict]) -> None:
        from peft.utils import set_peft_model_state_dict

        modules = {"transformer": self.transformer, "text_conditioner": _unwrap(self.text_conditioner),
                   "text_encoder": _unwrap(self.text_encoder)}
        for name, state in parts.items():
            if name not in modules:
                raise ConfigError(f"the saved network has a part {name!r} that Anima does not have")
            result = set_peft_model_state_dict(modules[name], state)
            unexpected = list(getattr(result, "unexpected_keys", []))
            if unexpected:
                raise ConfigError(f"the saved {name} network does not fit this model ({len(unexpected)} unknown keys)")

    # -- conditioning --------------------------------------------------------------------------
    def encode_images(self, pixels):
        """(mean, std) of the VAE posterior, unnormalised, (B, C, 1, h, w) for (B, 3, H, W) in [-1, 1]."""
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)[:, :, None]).latent_dist
        return dist.mean, dist.std

    def scale_latents(self, latents):
        """Raw VAE latents (C, 1, h, w) -> the DiT's space: per-channel (x - mean) / std."""
        return (latents - self.latents_mean) / self.latents_std

    def encode_text(self, captions: list[str]):
        """The DiT's text embeddings: Qwen3 last hidden states (masked) and the T5 token ids through
        the text conditioner, as the pipeline's encode + conditioning blocks do. Returns
        (embeddings, a (B, 1) placeholder where SDXL has its pooled embedding)."""
        import torch

        tokens = self.tokenizer(captions, padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        if ids.shape[-1] == 0:
            ids, mask = ids.new_zeros((ids.shape[0], 1)), mask.new_zeros((mask.shape[0], 1))
        t5 = self.t5_tokenizer(captions, padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                               return_tensors="pt")
        with torch.enable_grad() if self.train_text_encoder else torch.no_grad():
            states = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=False).last_hidden_state
            states = states * mask.to(states).unsqueeze(-1)
        grad = torch.enable_grad() if self.train_adapter or self.train_text_encoder else torch.no_grad()
        with grad:
            embeds = self.text_conditioner(
                source_hidden_states=states.to(self.weight_dtype), target_input_ids=t5.input_ids.to(self.device),
                target_attention_mask=t5.attention_mask.to(self.device), source_attention_mask=mask)
        return embeds, torch.zeros((len(captions), 1), device=self.device)

    def text_identity(self) -> str:
        from studio.training.cache import module_identity

        return module_identity(_unwrap(self.text_encoder), _unwrap(self.text_conditioner))

    def vae_identity(self) -> str:
        from studio.training.cache import module_identity

        return module_identity(self.vae)

    def time_ids(self, originals, crops, buckets):
        """Anima has no size conditioning: a placeholder so the engine's inputs keep their shape."""
        import torch

        return torch.zeros((len(buckets), 1), device=self.device)

    # -- the objective ---------------------------------------------------------------------------
    def draw_timestep(self, generator) -> float:
        """A sigma in (0, 1): logit-normal(0, 1), shifted (see the module docstring)."""
        import torch

        sigma = float(torch.sigmoid(SIGMOID_SCALE * torch.randn((1,), generator=generator)))
        return TIMESTEP_SHIFT * sigma / (1 + (TIMESTEP_SHIFT - 1) * sigma)

    def timestep_tensor(self, values: list, device):
        import torch

        return torch.tensor(values, device=device, dtype=torch.float32)

    def validation_timestep(self, timestep: int):
        import torch

        return torch.tensor([timestep / 1000.0], device=self.device, dtype=torch.float32)

    def predict(self, noisy, sigmas, text, transformer=None):
        transformer = transformer if transformer is not None else self.transformer
        height, width = noisy.shape[-2] * VAE_SCALE, noisy.shape[-1] * VAE_SCALE
        padding_mask = noisy.new_zeros(1, 1, height, width)
        return transformer(hidden_states=noisy, timestep=sigmas.to(noisy.dtype), encoder_hidden_states=text,
                           padding_mask=padding_mask, return_dict=False)[0]

    def loss(self, inputs, unet=None):
        """Flow matching: x_t = (1 - s) x0 + s noise, target noise - x0, MSE per sample."""
        from studio.training.objective import masked_mse

        latents, noise, sigmas, text, _pooled, _time_ids = inputs
        s = sigmas.float().view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - s) * latents + s * noise
        dtype = self.weight_dtype
        prediction = self.predict(noisy.to(dtype), sigmas, text.to(dtype), transformer=unet).float()
        return masked_mse(prediction, noise - latents)

    # -- memory ---------------------------------------------------------------------------------
    def park_frozen(self, text: bool, vae: bool) -> None:
        if self.device.type != "cuda":
            return
        self._parked = [m for m, cached in ((self.text_encoder, text and not self.train_text_encoder),
                                            (self.vae, vae)) if cached]
        if text and not self.train_adapter and not self.train_text_encoder:
            self._parked.append(self.text_conditioner)
        for module in self._parked:
            module.to("cpu")

    def _unpark(self, back: bool) -> None:
        for module in getattr(self, "_parked", []):
            module.to(self.device if back else "cpu")

    # -- outputs -------------------------------------------------------------------------------
    def sample_images(self, prompts: list[str], negative: str, seed: int, steps: int, size: tuple[int, int],
                      cfg: float, stop=None) -> list:
        """Images from the model being trained (network active), with the pipeline's Euler
        flow-matching scheduler and a CPU generator seeded per prompt (as generate() seeds)."""
        import torch

        from studio.models.anima_compat import BLOCK_ERROR_LOGGER, GUIDER_LOGGER, quiet_logger

        pipe = self.pipe
        with quiet_logger(GUIDER_LOGGER):
            guider = pipe.get_component_spec("guider").create(guidance_scale=cfg)
        pipe.update_components(guider=guider)
        modules = [self.transformer, _unwrap(self.text_conditioner), _unwrap(self.text_encoder)]
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        self._unpark(back=True)
        try:
            images = []
            for i, prompt in enumerate(prompts):
                if stop is not None and stop.is_set():  # the modular pipeline has no step callback
                    raise JobStopped("sampling stopped")
                generator = torch.Generator("cpu").manual_seed(seed + i)
                low_precision = self.weight_dtype != torch.float32  # the trained network's fp32 weights too
                with torch.no_grad(), quiet_logger(BLOCK_ERROR_LOGGER), \
                        torch.autocast(self.device.type, self.weight_dtype, enabled=low_precision):
                    images += pipe(prompt=prompt, negative_prompt=negative, width=size[0], height=size[1],
                                   num_inference_steps=steps, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                   generator=[generator], output_type="pil", output="images")
            return images
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)
            self._unpark(back=False)

    def lora_tensors(self, prefixed: bool) -> dict:
        """{key: tensor} with alpha / r baked into lora_B; ComfyUI names (`diffusion_model.` + the
        original Cosmos path, `text_encoders.qwen3_06b.transformer.model.` + the Qwen3 path) or
        diffusers names (`transformer.` / `text_conditioner.` / `text_encoder.`)."""
        from studio.models.lora_format import ANIMA_COMFY_PREFIX, anima_original_path

        scale = self.config.network_alpha / self.config.network_dim
        out = {}
        for component, state in self.network_state().items():
            for key, tensor in state.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                module = key.removesuffix(".lora_A.weight")
                up = state[f"{module}.lora_B.weight"]
                if not prefixed:
                    name = f"{component}.{module}"
                elif component == "text_encoder":
                    name = f"{TEXT_ENCODER_COMFY_PREFIX}{module}"
                else:
                    name = f"{ANIMA_COMFY_PREFIX}{anima_original_path(component, module)}"
                out[f"{name}.lora_A.weight"] = tensor.detach().float().contiguous()
                out[f"{name}.lora_B.weight"] = (up.detach().float() * scale).contiguous()
        return out

    def export_kohya(self, path: Path, metadata: dict[str, str]) -> Path | None:
        """The family's shareable LoRA file: for Anima the ComfyUI / diffusion-pipe layout."""
        from studio.models.lora_format import _write_safetensors_atomically

        return _write_safetensors_atomically(Path(path), self.lora_tensors(prefixed=True), metadata)

    def export_diffusers(self, folder: Path, name: str) -> Path:
        """diffusers names (`transformer.<module>.lora_A/B.weight`, alpha baked in), written atomically."""
        from studio.models.lora_format import _write_safetensors_atomically

        return _write_safetensors_atomically(folder / f"{name}.safetensors", self.lora_tensors(prefixed=False),
                                             {"format": "diffusers"})

    def metadata_kwargs(self) -> dict:
        return {"base_model_version": self.base_model_version, "architecture": "anima/lora",
                "implementation": "diffusers/anima", "network_module": "networks.lora_anima"}


def _unwrap(module):
    return getattr(module, "module", module)
