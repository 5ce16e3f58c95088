"""The SDXL family for the training engine: frozen base model, a peft network on the UNet (and
optionally the text encoders), SDXL's conditioning (two CLIP encoders, pooled embedding, time ids),
sample images and kohya-format export."""

from __future__ import annotations

from pathlib import Path

from studio.errors import ConfigError, JobStopped
from studio.training.config import TrainConfig
from studio.training.network import finish_network, trainable

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD = ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONVOLUTIONS = ["conv1", "conv2", "conv_shortcut", "conv", "time_emb_proj"]  # LoCon: resnets and samplers
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_EXPORTABLE = ("lora", "dora")  # LoKr/LoHa are saved in peft's own format only


def unet_targets(target: str) -> list[str]:
    return {"attention": ATTENTION, "attention_ff": ATTENTION + FEED_FORWARD,
            "all": ATTENTION + FEED_FORWARD + CONVOLUTIONS}[target]


def network_config(config: TrainConfig, targets: list[str]):
    """The peft config of the network type (LoRA, DoRA, LoKr, LoHa)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if config.network_type in ("lora", "dora"):
        return LoraConfig(r=config.network_dim, lora_alpha=config.network_alpha, target_modules=targets,
                          use_dora=config.network_type == "dora", init_lora_weights=True)
    cls = LoKrConfig if config.network_type == "lokr" else LoHaConfig
    return cls(r=config.network_dim, alpha=config.network_alpha, target_modules=targets)


# The UNet in NHWC (channels-last) on CUDA. Off: on an H200 (bench/results/gpu_suite.json) the
# studio's step with it on took 1.29x a plain diffusers + peft step without it, while generation,
# which never used it, ran at 1.02x; channels-last is the one GPU-only difference between the two
# training loops. `python bench/profile_train.py` measures both layouts on the next GPU run.
CHANNELS_LAST = False

class SDXLTrainingModel:
    family = "sdxl"
    base_model_version = "sdxl_base_v1-0"
    SAMPLE_SAMPLER = "Euler a"  # what sample_images uses, by its Generate name (for the samples' infotext)

    def __init__(self, pipe, config: TrainConfig, device, weight_dtype):
        import torch
        from diffusers import DDPMScheduler

        if config.train_llm_adapter:
            raise ConfigError("train_llm_adapter is an Anima setting; SDXL has no LLM adapter")
        self.pipe, self.config, self.device, self.weight_dtype = pipe, config, device, weight_dtype
        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        prediction = "v_prediction" if config.v_parameterization else "epsilon"
        self.noise_scheduler = DDPMScheduler.from_config(
            pipe.scheduler.config, prediction_type=prediction, rescale_betas_zero_snr=config.zero_terminal_snr)
        self.vae_dtype = torch.float32 if getattr(self.vae.config, "force_upcast", False) else weight_dtype
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False)
            module.eval()
        self.unet.to(device, weight_dtype)
        if CHANNELS_LAST and torch.device(device).type == "cuda":  # cuDNN's NHWC convolutions
            self.unet.to(memory_format=torch.channels_last)
        self.vae.to(device, self.vae_dtype)
        for encoder in self.text_encoders:
            encoder.to(device, weight_dtype)
        self.scaling_factor = self.vae.config.scaling_factor

    # -- the network ---------------------------------------------------------------------------
    def add_network(self) -> list[dict]:
        """Add the trainable network; returns optimizer parameter groups with their learning rates."""
        import torch

        config = self.config
        torch.manual_seed(config.seed)  # the network's initial weights depend on the seed alone
        self.unet.add_adapter(network_config(config, unet_targets(config.network_target)))
        groups = [{"params": trainable(self.unet), "lr": config.unet_lr or config.learning_rate}]
        if config.train_text_encoder:
            if config.network_type not in ("lora", "dora"):
                raise ConfigError("text-encoder training supports LoRA and DoRA networks only")
            for encoder in self.text_encoders:
                encoder.add_adapter(network_config(config, TEXT_TARGETS))
                encoder.train()
            groups.append({"params": [p for e in self.text_encoders for p in trainable(e)],
                           "lr": config.text_encoder_lr or config.learning_rate})
        return finish_network(groups, self.unet, config.gradient_checkpointing, config.fp8_base)

    def trainable_modules(self) -> list:
        return [self.unet, *(self.text_encoders if self.config.train_text_encoder else [])]

    def network_state(self) -> dict[str, dict]:
        """peft state dicts of the trained parts, by pipeline component name."""
        from peft.utils import get_peft_model_state_dict

        parts = {"unet": get_peft_model_state_dict(self.unet)}
        if self.config.train_text_encoder:
            parts["text_encoder"] = get_peft_model_state_dict(self.text_encoders[0])
            parts["text_encoder_2"] = get_peft_model_state_dict(self.text_encoders[1])
        return parts

    def load_network_state(self, parts: dict[str, dict]) -> None:
        from peft.utils import set_peft_model_state_dict

        modules = {"unet": self.unet, "text_encoder": self.text_encoders[0], "text_encoder_2": self.text_encoders[1]}
        for name, state in parts.items():
            result = set_peft_model_state_dict(modules[name], state)
            missing = [k for k in getattr(result, "unexpected_keys", [])]
            if missing:
                raise ConfigError(f"the saved {name} network does not fit this model ({len(missing)} unknown keys)")

    # -- conditioning --------------------------------------------------------------------------
    def encode_images(self, pixels):
        """(mean, std) of the VAE posterior, unscaled, for a (B, 3, H, W) batch in [-1, 1]."""
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean, dist.std

    def encode_text(self, captions: list[str]):
        """SDXL's text conditioning: penultimate hidden states of both encoders, concatenated,
        and encoder 2's pooled projection. Gradients flow when the encoders are trained."""
        import torch

        from studio.generation.conditioning import caption_chunk_ids

        chunks = self.config.max_token_length // 75
        states, pooled = [], None
        grad = torch.enable_grad() if self.config.train_text_encoder else torch.no_grad()
        with grad:
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                if chunks == 1:
                    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
                else:  # each caption in `chunks` windows, encoded together, joined as generation joins them
                    ids = torch.tensor([row for caption in captions
                                        for row in caption_chunk_ids(tokenizer, caption, chunks)])
                output = encoder(ids.to(self.device), output_hidden_states=True)
                hidden = output.hidden_states[-2]
                states.append(hidden.reshape(len(captions), -1, hidden.shape[-1]))
                pooled = output[0][::chunks]  # the first window's, as in generation
        return torch.cat(states, dim=-1), pooled

    def text_identity(self) -> str:
        from studio.training.cache import module_identity

        identity = module_identity(*self.text_encoders)
        tokens = self.config.max_token_length
        return identity if tokens == 75 else f"{identity}-tokens{tokens}"

    def vae_identity(self) -> str:
        from studio.training.cache import module_identity

        return module_identity(self.vae)

    def time_ids(self, originals, crops, buckets):
        """SDXL's size conditioning from (width, height) sizes and (left, top) crops, as trained."""
        from studio.training.objective import sdxl_time_ids

        return sdxl_time_ids([(o[1], o[0]) for o in originals], [(c[1], c[0]) for c in crops],
                             [(b[1], b[0]) for b in buckets], device=self.device)

    # -- the objective ---------------------------------------------------------------------------
    validation_timesteps = (100, 300, 500, 700, 900)

    def scale_latents(self, latents):
        return latents * self.scaling_factor

    def draw_timestep(self, generator) -> int:
        import torch

        return int(torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=generator))

    def timestep_tensor(self, values: list, device):
        import torch

        return torch.tensor(values, device=device, dtype=torch.long)

    def validation_timestep(self, timestep: int):
        import torch

        return torch.tensor([timestep], device=self.device)

    def loss(self, inputs, unet=None):
        """Per-sample MSE of the prediction against its epsilon / v target, min-SNR weighted if asked."""
        from studio.training.objective import masked_mse, min_snr_weights, target_for

        config = self.config
        latents, noise, timesteps, text, pooled, time_ids = inputs
        scheduler = self.noise_scheduler
        prediction_type = scheduler.config.prediction_type
        noisy = scheduler.add_noise(latents, noise, timesteps)
        dtype = self.weight_dtype
        prediction = self.predict(noisy.to(dtype), timesteps, text.to(dtype), pooled.to(dtype), time_ids.to(dtype),
                                  unet=unet).float()
        target = target_for(prediction_type, latents, noise, timesteps, scheduler)
        weights = None
        if config.min_snr_gamma:
            weights = min_snr_weights(timesteps, scheduler.alphas_cumprod.to(timesteps.device), config.min_snr_gamma,
                                      prediction_type)
        return masked_mse(prediction, target, weights)

    def use_prepared(self, modules: list) -> None:
        """The text encoders as accelerate prepared them (DDP-wrapped when distributed)."""
        if self.config.train_text_encoder:
            self.text_encoders = list(modules)

    def metadata_kwargs(self) -> dict:
        return {}

    def predict(self, noisy, timesteps, text, pooled, time_ids, unet=None):
        unet = unet if unet is not None else self.unet
        return unet(noisy, timesteps, encoder_hidden_states=text,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    # -- memory ---------------------------------------------------------------------------------
    def park_frozen(self, text: bool, vae: bool) -> None:
        """Move frozen parts whose outputs are all cached off the GPU (about 2 GB for SDXL's text
        encoders and fp32 VAE); `sample_images` brings them back for its few seconds."""
        if self.device.type != "cuda":
            return
        self._parked = [m for m, cached in ((self.text_encoders[0], text), (self.text_encoders[1], text),
                                            (self.vae, vae)) if cached]
        for module in self._parked:
            module.to("cpu")

    def _unpark(self, back: bool) -> None:
        for module in getattr(self, "_parked", []):
            module.to(self.device if back else "cpu")

    # -- outputs -------------------------------------------------------------------------------
    def sample_images(self, prompts: list[str], negative: str, seed: int, steps: int, size: tuple[int, int],
                      cfg: float, stop=None) -> list:
        """Images from the model being trained (network active), fixed seed per prompt, made as
        the Generate tab makes them (its prompt encoder: A1111 emphasis, 75-token chunks, zeros for
        an empty negative; the weights' precision), so a sample equals the app's image with the
        saved LoRA. A set `stop` event raises JobStopped at the next denoising step."""
        import torch
        from diffusers import EulerAncestralDiscreteScheduler

        from studio.generation.conditioning import encode_prompt_sdxl

        pipe = self.pipe
        original = pipe.scheduler
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
        pipe.set_progress_bar_config(disable=True)
        was_training = self.unet.training
        self.unet.eval()
        self._unpark(back=True)
        try:
            images = []
            low_precision = self.weight_dtype != torch.float32  # the trained network's fp32 weights too
            for i, prompt in enumerate(prompts):
                generator = torch.Generator("cpu").manual_seed(seed + i)
                with torch.no_grad(), torch.autocast(self.device.type, self.weight_dtype, enabled=low_precision):
                    conditioning = encode_prompt_sdxl(pipe, prompt, negative, self.device)
                    images += pipe(**conditioning.pipeline_kwargs(), width=size[0], height=size[1],
                                   num_inference_steps=steps, guidance_scale=cfg, generator=generator,
                                   callback_on_step_end=_stop_check(stop)).images
            return images
        finally:
            pipe.scheduler = original
            self.unet.train(was_training)
            self._unpark(back=False)

    def export_kohya(self, path: Path, metadata: dict[str, str]) -> Path | None:
        """The network as a kohya LoRA file (SGM names, real alpha); None for LoKr/LoHa."""
        from studio.models.lora_format import save_kohya_lora

        if self.config.network_type not in KOHYA_EXPORTABLE:
            return None
        parts = self.network_state()
        return save_kohya_lora(path, unet=parts["unet"], text_encoder=parts.get("text_encoder"),
                               text_encoder_2=parts.get("text_encoder_2"), alpha=self.config.network_alpha,
                               metadata=metadata, layers_per_block=self.unet.config.layers_per_block)

    def export_diffusers(self, folder: Path, name: str) -> Path:
        """The network in diffusers' LoRA format (or peft's, for LoKr/LoHa), written atomically."""
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        from studio.fileio import atomic_path

        parts = self.network_state()
        if self.config.network_type not in KOHYA_EXPORTABLE:
            return self.export_peft(folder / name, parts)
        target = folder / f"{name}.safetensors"
        with atomic_path(target) as tmp:
            StableDiffusionXLPipeline.save_lora_weights(
                tmp.parent, weight_name=tmp.name,
                unet_lora_layers=convert_state_dict_to_diffusers(parts["unet"]),
                text_encoder_lora_layers=convert_state_dict_to_diffusers(parts["text_encoder"])
                if "text_encoder" in parts else None,
                text_encoder_2_lora_layers=convert_state_dict_to_diffusers(parts["text_encoder_2"])
                if "text_encoder_2" in parts else None,
                unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
            )
        return target

    def export_peft(self, folder: Path, parts: dict[str, dict]) -> Path:
        """LoKr/LoHa in peft's own layout (adapter_model.safetensors + adapter_config.json per
        component): reloadable with peft; A1111/ComfyUI do not read it."""
        import json

        from safetensors.torch import save_file

        from studio.fileio import atomic_path, atomic_write_text

        modules = {"unet": self.unet, "text_encoder": self.text_encoders[0], "text_encoder_2": self.text_encoders[1]}
        for component, state in parts.items():
            with atomic_path(folder / component / "adapter_model.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                          metadata={"network_type": self.config.network_type})
            config = modules[component].peft_config["default"].to_dict()
            atomic_write_text(folder / component / "adapter_config.json", json.dumps(config, default=list, indent=1))
        return folder


def _stop_check(stop):
    """A diffusers step-end callback that raises JobStopped once `stop` is set."""

    def check(pipe, step, timestep, callback_kwargs):
        if stop is not None and stop.is_set():
            raise JobStopped("sampling stopped")
        return callback_kwargs

    return check
