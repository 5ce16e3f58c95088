"""The diffusion objective's pieces against their closed forms and hand-computed values."""

import math
import subprocess
import sys

import pytest

from studio.errors import ConfigError
from studio.training.objective import (
    masked_mse,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    sdxl_time_ids,
    signal_to_noise_ratio,
    target_for,
    zero_terminal_snr_betas,
    zero_terminal_snr_scheduler,
)

torch = pytest.importorskip("torch")


def sdxl_scheduler(**overrides):
    """The noise schedule SDXL and Animagine XL 3.1 were trained with."""
    from diffusers import DDPMScheduler

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear"}
    return DDPMScheduler(**{**config, **overrides})


def test_importing_objective_does_not_import_torch():
    code = "import sys, studio.training.objective; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- noise -------------------------------------------------------------------------------------

def test_noise_without_offset_is_plain_gaussian_noise_from_the_generator():
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, torch.Generator().manual_seed(7))
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)))


def test_noise_offset_adds_one_draw_per_sample_and_channel():
    latents = torch.zeros(3, 4, 8, 6)
    noise = sample_noise(latents, torch.Generator().manual_seed(7), noise_offset=0.1)
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(3, 4, 8, 6, generator=generator)
    offset = torch.randn(3, 4, 1, 1, generator=generator)
    torch.testing.assert_close(noise, base + 0.1 * offset)
    shift = noise - base  # constant over each sample's channel plane, different across planes
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift[:, :, 0, 0].unique().numel() == 12


def test_noise_keeps_the_latents_dtype_and_handles_video_latents():
    latents = torch.zeros(2, 16, 1, 4, 4, dtype=torch.bfloat16)  # Anima: (B, C, T, H, W)
    noise = sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.05)
    assert noise.dtype == torch.bfloat16 and noise.shape == latents.shape


# --- timesteps ---------------------------------------------------------------------------------

def test_timesteps_are_uniform_ints_over_the_whole_range():
    timesteps = sample_timesteps(20000, 10, torch.Generator().manual_seed(0))
    assert timesteps.dtype == torch.int64 and timesteps.shape == (20000,)
    counts = torch.bincount(timesteps, minlength=10)
    assert counts.numel() == 10 and ((counts - 2000).abs() < 200).all(), counts


def test_timesteps_respect_min_and_max_and_the_generator():
    draw = sample_timesteps(5000, 1000, torch.Generator().manual_seed(3), min_timestep=200, max_timestep=300)
    assert draw.min() == 200 and draw.max() == 299  # max is exclusive, as in kohya
    again = sample_timesteps(5000, 1000, torch.Generator().manual_seed(3), min_timestep=200, max_timestep=300)
    assert torch.equal(draw, again)


@pytest.mark.parametrize("low, high", [(-1, 10), (500, 500), (0, 1001), (600, 400)])
def test_impossible_timestep_ranges_are_refused(low, high):
    with pytest.raises(ConfigError, match="timestep range"):
        sample_timesteps(4, 1000, min_timestep=low, max_timestep=high)


# --- Min-SNR-gamma -----------------------------------------------------------------------------

def test_min_snr_weights_by_hand():
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.2, 0.0])  # SNR 9, 1, 0.25, 0
    timesteps = torch.tensor([0, 1, 2, 3])
    eps = min_snr_weights(timesteps, alphas_cumprod, 5.0, "epsilon")
    v = min_snr_weights(timesteps, alphas_cumprod, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.tensor([5 / 9, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(v, torch.tensor([5 / 10, 1 / 2, 0.25 / 1.25, 0.0]))
    assert eps.dtype == torch.float32 and eps.shape == (4,)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_closed_form_on_sdxls_schedule(gamma, prediction_type):
    alphas_cumprod = sdxl_scheduler().alphas_cumprod
    timesteps = torch.arange(0, 1000, 7)
    weights = min_snr_weights(timesteps, alphas_cumprod, gamma, prediction_type)
    for t, weight in zip(timesteps.tolist(), weights.tolist()):
        alpha_bar = float(alphas_cumprod[t])
        snr = alpha_bar / (1 - alpha_bar)
        denominator = snr if prediction_type == "epsilon" else snr + 1
        assert weight == pytest.approx(min(snr, gamma) / denominator, rel=1e-6), t
    clipped = signal_to_noise_ratio(timesteps, alphas_cumprod) > gamma
    assert clipped.any() and (~clipped).any(), "the test must cover SNRs on both sides of gamma"


def test_min_snr_weights_refuse_bad_settings():
    with pytest.raises(ConfigError, match="positive"):
        min_snr_weights(torch.tensor([1]), torch.tensor([0.5, 0.4]), 0.0, "epsilon")
    with pytest.raises(ConfigError, match="prediction type"):
        min_snr_weights(torch.tensor([1]), torch.tensor([0.5, 0.4]), 5.0, "sample")


# --- zero terminal SNR -------------------------------------------------------------------------

def test_zero_terminal_snr_rescales_sqrt_alpha_bar_linearly_to_zero():
    betas = sdxl_scheduler().betas
    rescaled = zero_terminal_snr_betas(betas)
    assert rescaled.dtype == betas.dtype and rescaled.shape == betas.shape
    old = torch.cumprod(1 - betas.double(), 0).sqrt()
    new = torch.cumprod(1 - rescaled.double(), 0).sqrt()
    assert torch.cumprod(1 - rescaled, 0)[-1] == 0.0 and rescaled[-1] == 1.0
    # Algorithm 1: shift so the last is 0, scale so the first is kept
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new[0], old[0])
    assert old[-1] > 0.05, "the original schedule must not already end at zero"
    assert ((rescaled > 0) & (rescaled <= 1)).all() and (new[1:] < new[:-1]).all()


def test_zero_terminal_snr_scheduler_matches_the_betas_and_keeps_the_config():
    original = sdxl_scheduler(prediction_type="v_prediction")
    scheduler = zero_terminal_snr_scheduler(original)
    assert scheduler.config.rescale_betas_zero_snr is True
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1] == 0.0
    expected = torch.cumprod(1 - zero_terminal_snr_betas(original.betas), 0)
    torch.testing.assert_close(scheduler.alphas_cumprod, expected, rtol=1e-5, atol=1e-7)
    assert zero_terminal_snr_scheduler(dict(original.config)).config.rescale_betas_zero_snr is True


def test_zero_terminal_snr_refuses_epsilon_models():
    with pytest.raises(ConfigError, match="v-prediction"):
        zero_terminal_snr_scheduler(sdxl_scheduler())


def test_min_snr_v_weights_on_a_zero_terminal_schedule_are_finite():
    scheduler = zero_terminal_snr_scheduler(sdxl_scheduler(prediction_type="v_prediction"))
    timesteps = torch.tensor([0, 500, 999])
    for prediction_type in ("epsilon", "v_prediction"):
        weights = min_snr_weights(timesteps, scheduler.alphas_cumprod, 5.0, prediction_type)
        assert torch.isfinite(weights).all(), prediction_type
    assert min_snr_weights(timesteps, scheduler.alphas_cumprod, 5.0, "v_prediction")[-1] == 0.0


# --- targets -----------------------------------------------------------------------------------

def test_epsilon_target_is_the_noise():
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert target_for("epsilon", latents, noise, torch.tensor([10, 900]), sdxl_scheduler()) is noise


def test_v_target_is_the_velocity_closed_form():
    scheduler = sdxl_scheduler(prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 4, 4, generator=generator)
    noise = torch.randn(3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([0, 499, 999])
    target = target_for("v_prediction", latents, noise, timesteps, scheduler)
    for i, t in enumerate(timesteps.tolist()):
        alpha_bar = float(scheduler.alphas_cumprod[t])
        expected = math.sqrt(alpha_bar) * noise[i] - math.sqrt(1 - alpha_bar) * latents[i]
        torch.testing.assert_close(target[i], expected)
    assert not torch.allclose(target, noise, atol=1e-3)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ConfigError, match="epsilon, v_prediction"):
        target_for("flow", torch.zeros(1), torch.zeros(1), torch.tensor([0]), sdxl_scheduler())


# --- SDXL size conditioning --------------------------------------------------------------------

def test_sdxl_time_ids_order_is_orig_crop_target_each_height_first():
    time_ids = sdxl_time_ids(
        original_size=[(1200, 800), (768, 1344)],  # (height, width): a portrait, then a landscape
        crop_top_left=[(16, 0), (0, 32)],  # (top, left)
        target_size=[(1216, 832), (768, 1344)],
    )
    assert time_ids.shape == (2, 6) and time_ids.dtype == torch.float32
    assert time_ids.tolist() == [[1200, 800, 16, 0, 1216, 832], [768, 1344, 0, 32, 768, 1344]]


def test_sdxl_time_ids_dtype_and_mismatched_batches():
    assert sdxl_time_ids([(64, 32)], [(0, 0)], [(64, 32)], dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="one size per sample"):
        sdxl_time_ids([(64, 32), (32, 64)], [(0, 0)], [(64, 32)])
    with pytest.raises(ValueError, match="pairs"):
        sdxl_time_ids([(64, 32, 3)], [(0, 0)], [(64, 32)])


# --- loss --------------------------------------------------------------------------------------

def two_sample_errors():
    """Sample 0's squared error is 1 everywhere (mean 1); sample 1's is [4, 4, 0, 0] (mean 2)."""
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 2.0], [0.0, 0.0]]]])
    return torch.zeros_like(target), target


def test_mse_is_the_mean_of_per_sample_means():
    pred, target = two_sample_errors()
    assert masked_mse(pred, target).item() == pytest.approx(1.5)


def test_weights_scale_each_samples_loss_then_average_over_the_batch():
    pred, target = two_sample_errors()
    loss = masked_mse(pred, target, torch.tensor([0.5, 2.0]))
    assert loss.item() == pytest.approx((0.5 * 1 + 2.0 * 2) / 2)  # 2.25, not divided by the weights' sum


def test_mask_averages_over_the_kept_pixels_only():
    pred, target = two_sample_errors()
    pred, target = pred.expand(2, 3, 2, 2), target.expand(2, 3, 2, 2)  # mask (B, 1, H, W) spans channels
    mask = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 1.0]]]])
    assert masked_mse(pred, target, mask=mask).item() == pytest.approx((0 + (4 + 0) / 2) / 2)


def test_loss_is_float32_and_differentiable_from_half_precision():
    pred = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = masked_mse(pred, torch.zeros(2, 4, 4, 4, dtype=torch.bfloat16), torch.tensor([1.0, 0.0]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad[0].abs().sum() > 0 and pred.grad[1].abs().sum() == 0  # weight 0: no gradient


def test_loss_shape_mismatches_are_bugs():
    with pytest.raises(ValueError, match="differ in shape"):
        masked_mse(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one weight per sample"):
        masked_mse(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(3))
