"""The memory a training run will need, estimated before it starts (`python -m studio train --plan`,
the Train tab's "Plan memory", the first line of every run's log).

Nothing is loaded or computed: the model is built on the meta device from its configs (a diffusers
folder's, or the real model's for a catalog model not downloaded yet), the run's own network is
added to it by the same code that trains (so the trainable parameters are exact), and one forward
pass at the largest bucket runs on meta tensors while autograd's saved-tensor hooks count the bytes
kept for the backward pass. With gradient checkpointing only the inputs of each checkpointed block
are kept, plus one block's activations while it is recomputed.

    weights      frozen parameters that stay on the device (text encoders and VAE leave it once
                 their outputs are cached), in the weights' dtype
    network      trainable parameters (fp32) + their gradients + optimizer state
    activations  as above, in the compute dtype
    workspace    a fixed allowance for the backward pass's transient buffers and the allocator

On a GPU the plan is compared with the card's free memory, and when it does not fit the settings
that would make it fit are named with what each saves ("turn on gradient checkpointing (-4.1 GB)").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.training.config import TrainConfig

GB = 1024**3
# transient buffers of the backward pass and allocator slack: on a GPU also cuBLAS/cuDNN workspaces
# and fragmentation. Calibrated on measured peaks: the CPU figure on tests/test_full_size.py's runs,
# the GPU figures on bench/gpu_suite.py's H200 run (bench/results/gpu_suite.json), where checkpointed
# training runs peaked ~0.6 GB below the activations-plus-0.75 GB estimate (the recomputed block is
# freed piece by piece) and runs without checkpointing ~0.5 GB above it
WORKSPACE_BYTES = {"gpu": int(0.75 * GB), "gpu_checkpointed": int(0.15 * GB), "cpu": int(0.25 * GB)}
# bytes of optimizer state per trainable parameter (fp32 weights)
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "AdamW8bit": 2, "Adafactor": 4, "Prodigy": 16, "Lion": 4}
CAST_LOGGER = "diffusers.models.modeling_utils"  # its "should be kept in float32" warnings


@dataclass
class MemoryPlan:
    parts: dict[str, int]  # name -> bytes
    device: str
    free_bytes: int | None = None
    advice: list[tuple[str, int]] = field(default_factory=list)  # (setting to change, bytes it saves)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.free_bytes is None else self.total <= self.free_bytes

    def summary(self) -> str:
        where = "RAM" if self.device == "cpu" else "VRAM"
        text = f"needs ~{self.total / GB:.1f} GB of {where}"
        if self.free_bytes is not None:
            text += f", you have {self.free_bytes / GB:.1f} GB free"
            if not self.fits and self.advice:
                text += ": " + " or ".join(f"{what} (-{saved / GB:.1f} GB)" for what, saved in self.advice[:3])
            elif not self.fits:
                text += ": lower the resolution or the batch size"
        return text

    def details(self) -> str:
        return ", ".join(f"{name} {size / GB:.2f} GB" for name, size in self.parts.items())


def _tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


@dataclass
class _Activations:
    """Bytes kept for the backward pass of one forward: outside the checkpointable blocks, inside
    each block, and the blocks' inputs (all a checkpointed block keeps)."""

    outside: int
    per_block: list[int]
    block_inputs: int

    def total(self, checkpointing: bool) -> int:
        if checkpointing:
            return self.outside + self.block_inputs + max(self.per_block, default=0)
        return self.outside + sum(self.per_block)


class _EfficientAttention:
    """scaled_dot_product_attention as flash / memory-efficient kernels keep it for the backward
    pass (q, k, v, the output and a float32 log-sum-exp per query), not as the math fallback that
    meta tensors would otherwise take (it keeps the whole attention matrix)."""

    def __init__(self):
        import torch

        class Attention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, query, key, value):
                out = query.new_empty(*query.shape[:-1], value.shape[-1])
                lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(query, key, value, out, lse)
                return out

            @staticmethod
            def backward(ctx, grad):  # pragma: no cover - the plan counts the forward pass only
                return None, None, None

        self.function = Attention

    def __call__(self, query, key, value, *args, **kwargs):
        return self.function.apply(query, key, value)


def _count_activations(model, run_forward) -> _Activations:
    """What autograd keeps for the backward pass of `run_forward()` on a meta model."""
    import torch

    seen: set[int] = set()
    keep: list = []  # holds the saved tensors so their ids stay unique
    outside = [0]
    per_block: list[int] = []
    block_inputs = [0]
    stack: list = []

    weights = {id(t) for t in (*model.unet.parameters(), *model.unet.buffers())}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) in weights:
            return tensor  # a weight (or a view of one) the backward pass reads: no new memory
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keep.append(tensor)
            size = tensor.numel() * tensor.element_size()
            if stack:
                per_block[-1] += size
            else:
                outside[0] += size
        return tensor

    def run_block(module, *args):
        outermost = not stack
        if outermost:
            per_block.append(0)
            block_inputs[0] += _tensor_bytes(args)
        stack.append(module)
        try:
            return module(*args)
        finally:
            stack.pop()

    denoiser = model.unet
    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=run_block)  # to see the blocks
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _EfficientAttention()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run_forward()
    finally:
        functional.scaled_dot_product_attention = original
        denoiser.disable_gradient_checkpointing()
    return _Activations(outside[0], per_block, block_inputs[0])


def _meta_model(config: TrainConfig, family: str, folder: Path | None):
    """The family's training model on the meta device with the run's network added."""
    from types import SimpleNamespace

    import torch

    from studio.models.anima_compat import quiet_logger
    from studio.models.full_size import meta_components

    components = meta_components(family, folder)
    from studio.training.trainer import _weight_dtype

    weight_dtype = _weight_dtype(config.mixed_precision)
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler

        from studio.training.sdxl import SDXLTrainingModel

        pipe = SimpleNamespace(**components, tokenizer=None, tokenizer_2=None,
                               scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"))
        with quiet_logger(CAST_LOGGER):  # "should be kept in float32": nothing runs in these weights
            model = SDXLTrainingModel(pipe, config, torch.device("meta"), weight_dtype)
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from studio.models.anima_compat import ensure_cosmos_resize
        from studio.training.anima import AnimaTrainingModel

        ensure_cosmos_resize()

        pipe = SimpleNamespace(**components, tokenizer=None, t5_tokenizer=None,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        with quiet_logger(CAST_LOGGER):
            model = AnimaTrainingModel(pipe, config, torch.device("meta"), weight_dtype)
    groups = model.add_network()
    for group in groups:  # the network computes in the compute dtype under autocast
        for param in group["params"]:
            param.data = param.data.to(weight_dtype)
    return model, groups, components, weight_dtype


def _forward(model, family: str, config: TrainConfig, batch: int, size: tuple[int, int], dtype):
    """One training forward on meta inputs of the run's shapes."""
    import torch

    meta = torch.device("meta")
    width, height = size
    if family == "sdxl":
        chunks = config.max_token_length // 75
        unet = model.unet.config
        text_dim = unet.cross_attention_dim
        pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        noisy = torch.empty(batch, model.unet.config.in_channels, height // 8, width // 8, device=meta, dtype=dtype)
        return lambda: model.predict(noisy, torch.zeros(batch, dtype=torch.long, device=meta),
                                     torch.empty(batch, 77 * chunks, text_dim, device=meta, dtype=dtype),
                                     torch.empty(batch, pooled, device=meta, dtype=dtype),
                                     torch.empty(batch, 6, device=meta, dtype=dtype))
    from studio.training.anima import MAX_SEQUENCE_LENGTH

    channels = model.transformer.config.in_channels
    noisy = torch.empty(batch, channels, 1, height // 8, width // 8, device=meta, dtype=dtype)
    text = torch.empty(batch, MAX_SEQUENCE_LENGTH, model.transformer.config.text_embed_dim, device=meta, dtype=dtype)
    return lambda: model.predict(noisy, torch.zeros(batch, device=meta, dtype=dtype), text)


def _largest_bucket(config: TrainConfig) -> tuple[int, int]:
    """The bucket with the most pixels the run can meet: a square at its largest resolution."""
    side = max(config.resolutions)
    return side, side


@dataclass
class _Measure:
    """One dry run's counts, from which the plan of any nearby setting is computed."""

    frozen: dict[str, int]  # component -> frozen parameters
    trainable: int
    activations: _Activations  # at the run's batch size, in its compute dtype
    batch: int
    itemsize: int  # of the compute dtype


def measure(config: TrainConfig, family: str, folder: Path | None) -> _Measure:
    model, groups, components, dtype = _meta_model(config, family, folder)
    forward = _forward(model, family, config, config.train_batch_size, _largest_bucket(config), dtype)
    activations = _count_activations(model, forward)
    frozen = {name: sum(p.numel() for p in module.parameters() if not p.requires_grad)
              for name, module in components.items()}
    trainable = sum(p.numel() for group in groups for p in group["params"])
    import torch

    return _Measure(frozen, trainable, activations, config.train_batch_size, torch.empty(0, dtype=dtype).element_size())


def _itemsize(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def _training_workspace(on_gpu: bool, config: TrainConfig) -> int:
    if not on_gpu:
        return WORKSPACE_BYTES["cpu"]
    return WORKSPACE_BYTES["gpu_checkpointed" if config.gradient_checkpointing else "gpu"]


def _plan(config: TrainConfig, counts: _Measure, device: str, free_bytes: int | None) -> MemoryPlan:
    on_gpu = device != "cpu"
    itemsize = _itemsize(config.mixed_precision)
    frozen = 0
    for name, parameters in counts.frozen.items():
        is_vae, is_text = name == "vae", name.startswith("text_")
        if on_gpu and ((is_vae and config.cache_latents) or
                       (is_text and config.cache_text_encoder_outputs and not config.train_text_encoder)):
            continue  # parked in RAM once its outputs are cached
        denoiser = not (is_vae or is_text or name == "text_conditioner")
        frozen += parameters * (4 if is_vae else 1 if denoiser and config.fp8_base else itemsize)
    scale = config.train_batch_size / counts.batch * itemsize / counts.itemsize
    activations = int(counts.activations.total(config.gradient_checkpointing) * scale)
    optimizer = OPTIMIZER_STATE_BYTES.get(config.optimizer_type, 8)
    plan = MemoryPlan({"weights": frozen, "network": counts.trainable * (4 + 4 + optimizer),
                       "activations": activations, "workspace": _training_workspace(on_gpu, config)},
                      device, free_bytes)
    if not config.cache_latents and on_gpu:
        plan.notes.append("the VAE encodes each batch on the device: its own peak comes on top at large sizes")
    if config.train_text_encoder:
        plan.notes.append("text-encoder activations are not counted")
    if config.fp8_base and not config.gradient_checkpointing:
        plan.notes.append("fp8 base without gradient checkpointing: each layer's upcast weights are kept for the "
                          "backward pass, which takes back much of the saving")
    return plan


def plan_training(config: TrainConfig, family: str, folder: Path | None, *, device: str = "cuda",
                  free_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of `config` on `device` (free_bytes: what the device has free), with advice
    when it does not fit."""
    counts = measure(config, family, folder)
    plan = _plan(config, counts, device, free_bytes)
    if plan.fits is False:
        plan.advice = _advice(config, counts, plan)
    return plan


def _advice(config: TrainConfig, counts: _Measure, plan: MemoryPlan) -> list:
    """Settings that would lower the plan, each with what it saves, most first."""
    options = []
    if not config.gradient_checkpointing:
        options.append(("turn on gradient checkpointing", {"gradient_checkpointing": True}))
    if config.optimizer_type in ("AdamW", "Prodigy"):
        options.append(("use AdamW8bit", {"optimizer_type": "AdamW8bit"}))
    if not config.cache_text_encoder_outputs and not config.train_text_encoder:
        options.append(("cache the text encoder outputs", {"cache_text_encoder_outputs": True}))
    if not config.cache_latents:
        options.append(("cache latents", {"cache_latents": True}))
    if config.train_batch_size > 1:
        options.append(("use batch size 1 (with gradient accumulation)", {"train_batch_size": 1}))
    if not config.fp8_base:
        options.append(("store the base model in fp8 (fp8_base)", {"fp8_base": True}))
    if config.mixed_precision == "no":
        options.append(("train in bf16", {"mixed_precision": "bf16"}))
    advice = []
    for label, change in options:
        saved = plan.total - _plan(config.model_copy(update=change), counts, plan.device, None).total
        if saved > 0.05 * GB:
            advice.append((label, saved))
    return sorted(advice, key=lambda item: -item[1])


def config_folder_for(config: TrainConfig, models_dir: Path) -> tuple[str, Path | None]:
    """(family, diffusers folder whose configs describe the run's model; None for the real
    model's configs). Looks at what is on disk only: nothing is downloaded."""
    return model_configs(config.pretrained_model, models_dir)


def model_configs(reference: str, models_dir: Path) -> tuple[str, Path | None]:
    """(family, diffusers folder whose configs describe the model `reference` names; None for the
    real model's configs). Looks at what is on disk only: nothing is downloaded."""
    from studio.models.catalog import load_catalog, resolve_reference
    from studio.models.loaders import local_copy_of

    source = resolve_reference(reference, load_catalog())
    if source.kind == "folder":
        return source.family, Path(source.location)
    if source.kind == "demo":
        from studio.models.loaders import materialize

        local = materialize(source, models_dir)
        return source.family, Path(local.config or local.location)
    if source.kind == "single_file":
        if source.family == "anima":
            from studio.models.loaders import local_anima_configs

            return "anima", local_anima_configs(Path(source.location), models_dir)
        from studio.models.loaders import sdxl_config_folder

        return "sdxl", sdxl_config_folder(Path(source.location), models_dir)
    local = local_copy_of(source, models_dir)
    if local is not None and local.kind == "folder":
        return source.family, Path(local.location)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the repo's configs, if the Hugging Face cache has them
        return source.family, Path(snapshot_download(source.location, allow_patterns=["*.json"], local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return source.family, None


def device_memory() -> tuple[str, int | None]:
    """(device the trainer will use, its free bytes): the first CUDA card's free memory, or the
    machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.mem_get_info(0)[0]
    try:
        import psutil

        return "cpu", psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return "cpu", None


def plan_for_this_machine(config: TrainConfig, models_dir: Path, device_info=None) -> MemoryPlan:
    """The plan of `config` on the device this machine trains on (`device_info`, a DeviceInfo,
    where the app knows it: a ZeroGPU Space's card), in the precision it will use there (a CPU
    without bf16 trains in fp32)."""
    from studio.training.trainer import cpu_precision

    if device_info is not None and device_info.accelerator:
        device, free = "cuda", device_info.free_bytes or device_info.total_bytes
    else:
        device, free = device_memory()
    if device == "cpu":
        config = config.model_copy(update={"mixed_precision": cpu_precision(config.mixed_precision)})
    family, folder = config_folder_for(config, models_dir)
    return plan_training(config, family, folder, device=device, free_bytes=free)


# -- generation -------------------------------------------------------------------------------------
class _LivePeak:
    """Follows the bytes of live tensors while meta ops run (new outputs added, freed ones taken
    away as Python drops them) and keeps the peak: what an inference pass holds at its worst."""

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                out = func(*args, **(kwargs or {}))
                for tensor in (out if isinstance(out, (list, tuple)) else [out]):
                    if isinstance(tensor, torch.Tensor) and tensor._base is None:
                        size = tensor.numel() * tensor.element_size()
                        tracker.live += size
                        tracker.peak = max(tracker.peak, tracker.live)
                        weakref.finalize(tensor, tracker._free, size)
                return out

        self.mode = Mode()

    def _free(self, size: int) -> None:
        self.live -= size


def _inference_peak(run) -> int:
    import torch

    tracker = _LivePeak()
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _EfficientAttention()
    try:
        with torch.no_grad(), tracker.mode:
            run()
    finally:
        functional.scaled_dot_product_attention = original
    return tracker.peak


def plan_generation(family: str, folder: Path | None, width: int, height: int, batch: int = 1, *,
                    policy: str = "high", device: str = "cuda", free_bytes: int | None = None,
                    dtype_bytes: int = 2) -> MemoryPlan:
    """The memory one generation needs at its peak, which is the denoising loop or the VAE decode,
    whichever is larger: the weights the VRAM policy keeps on the device during that phase (high:
    all of them; normal: that phase's model; low: a couple of streamed layers), plus the phase's
    working memory (the denoiser's at twice the batch for classifier-free guidance; the decode's,
    tile by tile and one image at a time under low, which tiles the VAE), plus the workspace.
    Checked against torch.cuda.max_memory_allocated on an H200 by bench/gpu_suite.py."""
    import torch

    from studio.models.anima_compat import quiet_logger
    from studio.models.full_size import meta_components

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    components = meta_components(family, folder)
    # every component's parameters in the one dtype, as the studio's loaders load a pipeline
    sizes = {name: sum(p.numel() for p in module.parameters()) * dtype_bytes
             + sum(b.numel() * b.element_size() for b in module.buffers()) for name, module in components.items()}
    denoiser_name = "unet" if family == "sdxl" else "transformer"
    with quiet_logger(CAST_LOGGER):
        vae = components["vae"].to(dtype)
    working = _generation_working(family, components[denoiser_name], vae, width, height, batch, dtype)
    streamed = _streamed_bytes(components[denoiser_name], dtype_bytes)
    return _generation_plan(sizes, denoiser_name, working, streamed, batch, policy, device, free_bytes)


def plan_loaded_generation(pipe, family: str, width: int, height: int, batch: int = 1, *, policy: str = "high",
                           device: str = "cuda", free_bytes: int | None = None) -> MemoryPlan:
    """The same plan for a pipeline already in memory: its weights as they are (their dtypes, any
    LoRA), and the working memory of meta copies of its denoiser and VAE (cached per shape)."""
    import json

    import torch

    sizes = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = list(module.parameters()) + list(module.buffers())
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    denoiser_name = "unet" if family == "sdxl" else "transformer"
    denoiser, vae = pipe.components[denoiser_name], pipe.components["vae"]
    key = (family, type(denoiser).__name__, json.dumps(dict(denoiser.config), sort_keys=True, default=str),
           type(vae).__name__, json.dumps(dict(vae.config), sort_keys=True, default=str), width, height, batch,
           str(denoiser.dtype), str(vae.dtype))
    working = _LOADED_WORKING.get(key)
    if working is None:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=True):
            meta_denoiser = type(denoiser).from_config(denoiser.config)
            meta_vae = type(vae).from_config(vae.config)
        from studio.models.anima_compat import quiet_logger

        with quiet_logger(CAST_LOGGER):
            meta_vae.to(vae.dtype)
        working = _generation_working(family, meta_denoiser, meta_vae, width, height, batch, denoiser.dtype)
        if len(_LOADED_WORKING) >= 64:
            _LOADED_WORKING.clear()
        _LOADED_WORKING[key] = working
    streamed = _streamed_bytes(denoiser, denoiser.dtype.itemsize)
    return _generation_plan(sizes, denoiser_name, working, streamed, batch, policy, device, free_bytes)


_LOADED_WORKING: dict[tuple, tuple] = {}  # plan_loaded_generation's meta passes, per model config and shape


def _streamed_bytes(denoiser, dtype_bytes: int) -> int:
    """What the low policy's leaf-level group offloading keeps on the device at once: the running
    layer and the one prefetched on the side stream, at most twice the largest layer."""
    largest = max((sum(p.numel() for p in module.parameters(recurse=False)) for module in denoiser.modules()),
                  default=0)
    return 2 * largest * dtype_bytes


def _vae_tile_latents(vae) -> tuple[int, int]:
    """(height, width) in latents of one tile of the VAE's tiled decode."""
    if hasattr(vae, "tile_latent_min_size"):  # AutoencoderKL
        return vae.tile_latent_min_size, vae.tile_latent_min_size
    ratio = getattr(vae, "spatial_compression_ratio", 8)
    return vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio


def _generation_working(family: str, denoiser, vae, width: int, height: int, batch: int, dtype) -> tuple:
    """Peak bytes of live tensors in one denoiser call (batch doubled for CFG), in one VAE decode of
    the batch, and in one tile of a tiled decode (one image), run on meta modules."""
    import torch

    from studio.models.anima_compat import ensure_cosmos_resize, quiet_logger

    with quiet_logger(CAST_LOGGER):
        denoiser, vae = denoiser.to(dtype).eval(), vae.eval()
    vae_dtype = next(vae.parameters()).dtype
    meta, rows = torch.device("meta"), 2 * batch
    tile_h, tile_w = (min(tile, side // 8) for tile, side in zip(_vae_tile_latents(vae), (height, width)))
    if family == "sdxl":
        config = denoiser.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        latents = torch.empty(rows, config.in_channels, height // 8, width // 8, device=meta, dtype=dtype)

        def run_denoiser():
            denoiser(latents, torch.zeros(rows, device=meta),
                     encoder_hidden_states=torch.empty(rows, 77, config.cross_attention_dim, device=meta, dtype=dtype),
                     added_cond_kwargs={"text_embeds": torch.empty(rows, pooled, device=meta, dtype=dtype),
                                        "time_ids": torch.empty(rows, 6, device=meta, dtype=dtype)})

        def decode(images: int, h: int, w: int):
            return lambda: vae.decode(torch.empty(images, vae.config.latent_channels, h, w, device=meta,
                                                  dtype=vae_dtype))
    else:
        ensure_cosmos_resize()
        from studio.training.anima import MAX_SEQUENCE_LENGTH

        config = denoiser.config
        latents = torch.empty(rows, config.in_channels, 1, height // 8, width // 8, device=meta, dtype=dtype)

        def run_denoiser():
            denoiser(hidden_states=latents, timestep=torch.zeros(rows, device=meta, dtype=dtype),
                     encoder_hidden_states=torch.empty(rows, MAX_SEQUENCE_LENGTH, config.text_embed_dim, device=meta,
                                                       dtype=dtype),
                     padding_mask=latents.new_zeros(1, 1, height, width), return_dict=False)

        def decode(images: int, h: int, w: int):
            return lambda: vae.decode(torch.empty(images, vae.config.z_dim, 1, h, w, device=meta, dtype=vae_dtype))
    return (_inference_peak(run_denoiser), _inference_peak(decode(batch, height // 8, width // 8)),
            _inference_peak(decode(1, tile_h, tile_w)))


def _generation_plan(sizes: dict[str, int], denoiser_name: str, working: tuple, streamed: int, batch: int,
                     policy: str, device: str, free_bytes: int | None) -> MemoryPlan:
    """The plan from the components' sizes and the phases' working memory (see plan_generation)."""
    denoiser_working, decode_working, tile_working = working
    everything = sum(sizes.values())

    def phases(name: str) -> list[tuple[int, int]]:  # (weights on the device, working) per phase
        if name in ("high", "cpu"):
            return [(everything, denoiser_working), (everything, decode_working)]
        if name == "normal":  # one model on the device at a time
            encoders = max((size for part, size in sizes.items() if part not in (denoiser_name, "vae")), default=0)
            return [(sizes[denoiser_name], denoiser_working), (sizes.get("vae", 0), decode_working), (encoders, 0)]
        return [(streamed, denoiser_working), (streamed, tile_working)]  # low: streamed layers, tiled decode

    def peak(name: str) -> tuple[int, int]:
        return max(phases(name), key=sum)

    weights, phase_working = peak(policy)
    workspace = WORKSPACE_BYTES["gpu" if device != "cpu" else "cpu"]
    plan = MemoryPlan({"weights": weights, "working": phase_working, "workspace": workspace}, device, free_bytes)
    if plan.fits is False:
        for other in ("normal", "low"):
            saved = sum(peak(policy)) - sum(peak(other))
            if saved > 0 and (other == "normal" or not plan.advice):
                plan.advice.append((f"use the {other} VRAM policy", saved))
        if batch > 1:
            plan.advice.append(("make one image per batch", phase_working - phase_working // batch))
    return plan
