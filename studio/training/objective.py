"""The pieces of the diffusion training objective for DDPM-style models (SDXL, Animagine XL 3.1):
noise, timesteps, the prediction target, Min-SNR-gamma loss weights, zero-terminal-SNR betas,
SDXL's size conditioning and the per-sample loss.

One training step, in these words:
    noise = sample_noise(latents, generator, noise_offset)
    timesteps = sample_timesteps(batch, scheduler.config.num_train_timesteps, generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text_embeddings, added_cond_kwargs={"time_ids": sdxl_time_ids(...), ...})
    target = target_for(prediction_type, latents, noise, timesteps, scheduler)
    weights = min_snr_weights(timesteps, scheduler.alphas_cumprod, 5.0, prediction_type)
    loss = masked_mse(pred, target, weights)

torch is imported inside the functions; importing this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from studio.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unsupported prediction type {prediction_type!r}; "
                          f"choose one of: {', '.join(PREDICTION_TYPES)}")


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None = None,
                 noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus kohya's noise offset: `noise_offset` times one
    normal draw per sample and channel (shape (B, C, 1, 1) for 4-D latents), which lets the model
    learn to shift an image's overall brightness. Drawn in float32 on the generator's device
    (noise first, then the offset), then moved to the latents' device and dtype."""
    import torch

    device = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset:
        per_channel = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        noise = noise + noise_offset * torch.randn(per_channel, generator=generator, device=device)
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     min_timestep: int = 0, max_timestep: int | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """`batch_size` timesteps drawn uniformly from [min_timestep, max_timestep) (int64); the
    range defaults to every training timestep, [0, num_train_timesteps)."""
    import torch

    max_timestep = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < max_timestep <= num_train_timesteps:
        raise ConfigError(f"timestep range [{min_timestep}, {max_timestep}) must lie within "
                          f"[0, {num_train_timesteps}) and hold at least one timestep")
    draw_device = generator.device if generator is not None else device
    timesteps = torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator,
                              device=draw_device)
    return timesteps.to(device) if device is not None else timesteps


def signal_to_noise_ratio(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) per timestep, in float64."""
    import torch

    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023), float32, shape (B,).

    The MSE on epsilon is weighted min(SNR, gamma) / SNR; on v, min(SNR, gamma) / (SNR + 1)
    (both the paper's x0-loss weight min(SNR, gamma) rewritten for that target). gamma = 5 is
    the paper's choice. At SNR 0 (zero-terminal-SNR schedules) the epsilon weight is its limit, 1.
    """
    import torch

    _check_prediction_type(prediction_type)
    if gamma <= 0:
        raise ConfigError(f"min_snr_gamma must be positive (5 is usual), got {gamma}")
    snr = signal_to_noise_ratio(timesteps, alphas_cumprod)
    if prediction_type == "epsilon":
        weights = torch.clamp(gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR, and 1 at SNR 0
    else:
        weights = torch.clamp(snr, max=gamma) / (snr + 1.0)
    return weights.float()


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep is pure noise (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is kept:
    sqrt(alpha_bar'_t) = (sqrt(alpha_bar_t) - sqrt(alpha_bar_T)) * sqrt(alpha_bar_1) /
    (sqrt(alpha_bar_1) - sqrt(alpha_bar_T)); the betas are then read back from alpha_bar'.
    The last beta becomes 1. Computed in float64, returned in the input's dtype."""
    import torch

    sqrt_alpha_bar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def zero_terminal_snr_scheduler(scheduler_or_config: Any) -> DDPMScheduler:
    """A DDPMScheduler for a v-prediction checkpoint with its betas rescaled to zero terminal
    SNR (diffusers' `rescale_betas_zero_snr`, the same rescale as `zero_terminal_snr_betas`).
    Takes a scheduler or its config; the flag is kept in the config, so a saved config says it.
    Sampling such a model also wants `timestep_spacing="trailing"`."""
    from diffusers import DDPMScheduler

    config = scheduler_or_config if isinstance(scheduler_or_config, Mapping) else scheduler_or_config.config
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type != "v_prediction":
        raise ConfigError("zero terminal SNR needs a v-prediction model, this one predicts "
                          f"{prediction_type!r}: at the last timestep the input is pure noise, so "
                          "predicting the noise teaches nothing; turn on v-parameterization or "
                          "turn off zero terminal SNR")
    return DDPMScheduler.from_config(config, rescale_betas_zero_snr=True)


def target_for(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               scheduler: Any) -> torch.Tensor:
    """What the model learns to predict: the noise (epsilon), or the velocity
    v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents (v_prediction)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def sdxl_time_ids(original_size: Sequence[tuple[int, int]], crop_top_left: Sequence[tuple[int, int]],
                  target_size: Sequence[tuple[int, int]], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL's size conditioning, one row per sample: (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w), shape (B, 6), float32 unless `dtype` says otherwise.

    Every size here is (height, width), as SDXL and diffusers order them; the dataset's buckets
    are (width, height), so swap when passing them. `crop_top_left` is (top, left)."""
    import torch

    if not len(original_size) == len(crop_top_left) == len(target_size):
        raise ValueError(f"one size per sample: got {len(original_size)} original sizes, "
                         f"{len(crop_top_left)} crops and {len(target_size)} target sizes")
    rows = []
    for original, crop, target in zip(original_size, crop_top_left, target_size):
        if not len(original) == len(crop) == len(target) == 2:
            raise ValueError(f"sizes and crops are pairs, got {original}, {crop}, {target}")
        rows.append([*original, *crop, *target])
    return torch.tensor(rows, dtype=dtype or torch.float32, device=device).reshape(len(rows), 6)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss: each sample's mean squared error (over the pixels `mask` keeps, if given,
    weighting each element by the mask), times that sample's weight, averaged over the batch.

    The weighted average is mean(weight * loss), not divided by the weights' sum, so Min-SNR
    weights scale each sample's gradient as in the paper. `mask` broadcasts to `pred` (e.g.
    (B, 1, H, W)); a sample whose mask is all zero adds 0. Computed in float32."""
    import torch

    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    squared_error = (pred.float() - target.float()) ** 2
    dims = tuple(range(1, squared_error.ndim))
    if mask is None:
        per_sample = squared_error.mean(dim=dims)
    else:
        mask = mask.to(squared_error).expand_as(squared_error)
        total = mask.sum(dim=dims)
        kept_error = (squared_error * mask).sum(dim=dims)
        per_sample = torch.where(total > 0, kept_error / total.clamp(min=1e-12), 0.0)
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(f"one weight per sample: weights {tuple(weights.shape)} "
                         f"for a batch of {len(per_sample)}")
    return (per_sample * weights.to(per_sample)).mean()
