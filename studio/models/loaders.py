"""Loading model weights: hub downloads, diffusers folders, single-file checkpoints, demo models.

Everything goes through diffusers' own loaders (from_pretrained / from_single_file, and for Anima
the modular pipeline's load_components), the same for demo models as for real ones. Only
safetensors weights are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from studio.errors import ModelNotFoundError, UnsafeCheckpointError
from studio.models.catalog import HUB_ID, ModelSource, check_not_pickle, family_of_folder, folder_index
from studio.wording import a

Progress = Callable[[float | None, str], None]

# Which repo files a diffusers pipeline needs: its index, configs, tokenizers (vocab/merges .txt,
# T5's spiece .model, Qwen's chat-template .jinja) and safetensors weights; not the pickled .bin
# copies, fp16 variants, ONNX/Flax exports or the root single-file checkpoint. One list serves
# SDXL and Anima repos alike, so a hub id's family can be read from what was downloaded.
HUB_ALLOW = [
    "model_index.json",
    "modular_model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/*.safetensors",
    "*/*.model",
    "*/*.jinja",
]
HUB_IGNORE = ["*.fp16.safetensors", "*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data"]
PIPELINE_CLASSES = {"sdxl": "StableDiffusionXLPipeline", "anima": "AnimaModularPipeline"}
# Anima's components in a diffusers folder, all of which a text-to-image run needs.
ANIMA_COMPONENTS = ("text_encoder", "tokenizer", "t5_tokenizer", "text_conditioner", "transformer", "vae", "scheduler")
ANIMA_WEIGHTED = ("text_encoder", "text_conditioner", "transformer", "vae")
ANIMA_LAYOUT = (
    "Anima loads from its diffusers layout: a folder with modular_model_index.json and the "
    "subfolders transformer/, text_conditioner/, text_encoder/, tokenizer/, t5_tokenizer/, vae/ and "
    "scheduler/, such as circlestone-labs/Anima-Base-v1.0-Diffusers (use the catalog name 'anima', "
    "the hub id, or a downloaded copy of it)"
)


@dataclass
class LoadedModel:
    model: object  # a diffusers pipeline
    size_bytes: int
    largest_component_bytes: int
    weights_file: Path | None  # the file whose hash identifies the model in infotext


def _noop(fraction: float | None, message: str) -> None:
    return None


def tqdm_reporting(progress: Progress, what: str):
    """A tqdm class that forwards download progress to `progress` (for the UI's progress bar)."""
    from tqdm.auto import tqdm

    class ReportingTqdm(tqdm):
        def update(self, n=1):
            result = super().update(n)
            if self.total:
                progress(min(self.n / self.total, 1.0), f"downloading {what}: {self.desc or ''}".strip())
            return result

    return ReportingTqdm


VLM_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]


def download_from_hub(repo_id: str, models_dir: Path, progress: Progress = _noop,
                      ignore: list[str] | None = None) -> Path:
    """Fetch (or find in the cache) a diffusers repo; offline and not cached gives a clear message."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=None if ignore else HUB_ALLOW,  # into the standard Hugging Face cache
            # (HF_HOME), where a Space's preload_from_hub put its files and persistent storage keeps them
            ignore_patterns=ignore or HUB_IGNORE,
            tqdm_class=tqdm_reporting(progress, repo_id),
        )
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id} is not in the models cache and the hub cannot be reached (offline). Either "
            f"connect once so it downloads, or put its diffusers folder at {models_dir / repo_id.split('/')[-1]} "
            "(or a .safetensors checkpoint anywhere and give its path), or start the app with --demo."
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFoundError(f"the hub has no accessible repo {repo_id!r}: {exc.__class__.__name__}") from None
    except OSError as exc:  # network failures surface as OSError subclasses
        raise ModelNotFoundError(f"could not download {repo_id}: {exc}") from None
    return Path(folder)


def local_copy_of(source: ModelSource, models_dir: Path) -> ModelSource | None:
    """A catalog/hub model the user placed in the models cache by hand: models/<name>[.safetensors]."""
    for candidate in (models_dir / source.name, models_dir / source.location.split("/")[-1]):
        if folder_index(candidate) is not None:
            family = family_of_folder(candidate, source.family)
            return ModelSource(source.name, family, "folder", str(candidate), source.vae, None, source.defaults)
        single = candidate.with_name(candidate.name + ".safetensors")
        if single.is_file():
            return ModelSource(source.name, source.family, "single_file", str(single), source.vae, None, source.defaults)
    return None


def materialize(source: ModelSource, models_dir: Path, progress: Progress = _noop) -> ModelSource:
    """Turn hub and demo sources into local folders/files (downloading or building them)."""
    if source.family == "tagger":
        from studio.captioning.tagger import resolve_tagger

        folder = resolve_tagger(source.location, models_dir, progress)
        return ModelSource(source.name, "tagger", "folder", str(folder), demo=source.demo)
    if source.family == "vlm":
        if HUB_ID.match(source.location) and not Path(source.location).is_absolute():
            # fetched here, so transformers gets a folder and never reads owner/name beside the app
            folder = download_from_hub(source.location, models_dir, progress, ignore=VLM_IGNORE)
            return ModelSource(source.name, "vlm", "folder", str(folder), demo=source.demo)
        return source
    if source.kind == "demo" and source.location == "anima":
        from studio.models.demo_anima import ensure_demo_anima

        progress(None, "building the demo model (first use only)")
        folder = ensure_demo_anima(models_dir)
        return ModelSource(source.name, "anima", "folder", str(folder), None, None, source.defaults, True)
    if source.kind == "demo":
        from studio.models.demo import ensure_demo_sdxl

        progress(None, "building the demo model (first use only)")
        demo = ensure_demo_sdxl(models_dir)
        if source.location == "sdxl-single-file":
            return ModelSource(source.name, source.family, "single_file", str(demo.single_file), source.vae,
                               str(demo.folder), source.defaults, True)
        return ModelSource(source.name, source.family, "folder", str(demo.folder), source.vae, None, source.defaults, True)
    if source.kind == "single_file" and source.family == "sdxl" and not source.config:
        folder = sdxl_config_folder(Path(source.location), models_dir)
        return replace(source, config=str(folder)) if folder else source
    if source.kind == "single_file" and source.family == "anima":
        return replace(source, config=str(anima_config_folder(source, models_dir, progress)))
    if source.kind == "hub":
        local = local_copy_of(source, models_dir)
        if local is not None:
            return local
        folder = download_from_hub(source.location, models_dir, progress)
        family = family_of_folder(folder, source.family)
        return ModelSource(source.name, family, "folder", str(folder), source.vae, None, source.defaults)
    return source


def _sgm_unet_signature(path: Path) -> tuple | None:
    """(first channels, input channels, class-embedding width, middle transformer depth) of an
    SGM single-file SDXL UNet, from its header."""
    from studio.models.catalog import safetensors_keys, safetensors_shape

    prefix = "model.diffusion_model."
    conv_in = safetensors_shape(path, f"{prefix}input_blocks.0.0.weight")
    label = safetensors_shape(path, f"{prefix}label_emb.0.0.weight")
    if not conv_in or not label:
        return None
    middle = f"{prefix}middle_block.1.transformer_blocks."
    depth = {k.removeprefix(middle).split(".")[0] for k in safetensors_keys(path) if k.startswith(middle)}
    return conv_in[0], conv_in[1], label[1], len(depth)


def sdxl_config_folder(path: Path, models_dir: Path) -> Path | None:
    """An SDXL diffusers folder in the models cache whose UNet has the single file's shape: its
    configs and tokenizers let diffusers load the file offline (it would otherwise fetch them
    from the hub). None when there is none."""
    signature = _sgm_unet_signature(path)
    if signature is None or not models_dir.is_dir():
        return None
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if family_of_folder(folder, "") != "sdxl":
            continue
        try:
            config = json.loads((folder / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            continue
        layers = config.get("transformer_layers_per_block", 1)
        depth = layers[-1] if isinstance(layers, list) else layers
        if (config.get("block_out_channels", [0])[0], config.get("in_channels"),
                config.get("projection_class_embeddings_input_dim"), depth) == signature:
            return folder
    return None


ANIMA_CONFIG_ALLOW = ["modular_model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.jinja"]


def local_anima_configs(dit: Path, models_dir: Path) -> Path | None:
    """An Anima diffusers folder in the models cache whose DiT has the file's width and depth."""
    from studio.models.anima_comfy import config_fits

    folders = sorted(p for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    return next((p for p in folders if family_of_folder(p, "") == "anima" and config_fits(p, dit)), None)


def anima_config_folder(source: ModelSource, models_dir: Path, progress: Progress = _noop) -> Path:
    """Where the configs, tokenizers and scheduler for ComfyUI's Anima files come from: the
    source's own `config` (a folder or hub id), else an Anima diffusers folder in the models cache
    whose DiT has the file's shape (demo-anima is built for a file of its size), else the configs
    (no weights, a few MB) of the catalog's Anima repo."""
    from studio.models.anima_comfy import config_fits
    from studio.models.catalog import load_catalog

    dit = Path(source.location)
    if source.config:
        folder = Path(source.config)
        if not folder.is_dir():
            folder = download_from_hub(source.config, models_dir, progress)
        if config_fits(folder, dit):
            return folder
        raise ModelNotFoundError(f"{dit.name} does not have the shape of the Anima model in {source.config}")
    local = local_anima_configs(dit, models_dir)
    if local is not None:
        return local
    from studio.models.anima_comfy import dit_size, size_of_config
    from studio.models.demo_anima import DEMO_DIT_SIZE, ensure_demo_anima

    if dit_size(dit) == size_of_config(DEMO_DIT_SIZE):  # demo-anima written in ComfyUI's layout
        progress(None, "building the demo model's configs (first use only)")
        folder = ensure_demo_anima(models_dir)
        if config_fits(folder, dit):
            return folder
    repo = next((e.source for e in load_catalog().values() if e.family == "anima" and not e.demo), None)
    if repo is None:
        raise ModelNotFoundError(f"{dit.name}: no Anima configs to load it with. {ANIMA_LAYOUT}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    progress(None, f"fetching Anima's configs and tokenizers from {repo}")
    try:
        folder = Path(snapshot_download(repo, allow_patterns=ANIMA_CONFIG_ALLOW,
                                        tqdm_class=tqdm_reporting(progress, repo)))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{dit.name} is Anima's diffusion model in ComfyUI's layout. Its configs and tokenizers "
            f"(a few MB, not in ComfyUI's files) come from {repo}, which is not cached and the hub cannot be "
            f"reached: connect once, or put that repo's diffusers folder in {models_dir}"
        ) from None
    except OSError as exc:
        raise ModelNotFoundError(f"could not fetch Anima's configs from {repo}: {exc}") from None
    if not config_fits(folder, dit):
        raise ModelNotFoundError(f"{dit.name} does not have the shape of {repo}'s Anima: another model's file?")
    return folder


def check_safetensors(path: Path) -> None:
    """Fail early, and clearly, on a file that is not a readable safetensors file."""
    check_not_pickle(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise UnsafeCheckpointError(f"{path.name} is a pickle file renamed to .safetensors; refusing to load it.")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # safetensors raises its own error types for every header problem
        raise ModelNotFoundError(f"{path.name} is not a valid safetensors file ({exc}); re-download it.") from None


def _check_pipeline_class(folder: Path, family: str) -> None:
    index_file = folder_index(folder)
    index = json.loads(index_file.read_text()) if index_file else {}
    expected = PIPELINE_CLASSES[family]
    found = index.get("_class_name", "?")
    if found != expected:
        example = ANIMA_LAYOUT if family == "anima" else "an SDXL model such as Animagine XL 3.1"
        raise ModelNotFoundError(f"{folder.name} is {a(found)}; this model family needs {a(expected)} ({example}).")


def _load_vae(reference: str, dtype):
    from diffusers import AutoencoderKL

    path = Path(reference)
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
        return AutoencoderKL.from_single_file(str(path), torch_dtype=dtype)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    return AutoencoderKL.from_pretrained(reference, torch_dtype=dtype, use_safetensors=True)


def quiet_library_progress_bars() -> None:
    """The studio reports loading progress itself; the libraries' own bars would only add noise."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_sdxl(source: ModelSource, dtype, device: str, progress: Progress = _noop) -> LoadedModel:
    """Load a materialized (folder or single-file) SDXL source into RAM."""
    from diffusers import StableDiffusionXLPipeline

    quiet_library_progress_bars()
    from studio.models.vram import pipeline_bytes

    extra = {"vae": _load_vae(source.vae, dtype)} if source.vae else {}
    progress(None, f"loading {source.name}")
    if source.kind == "folder":
        folder = Path(source.location)
        _check_pipeline_class(folder, source.family)
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, **extra)
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    elif source.kind == "single_file":
        weights = Path(source.location)
        check_safetensors(weights)
        config = {"config": source.config} if source.config else {}
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(str(weights), torch_dtype=dtype, **config, **extra)
        except OSError as exc:
            raise ModelNotFoundError(
                f"could not load {weights.name} as an SDXL checkpoint: {exc}. Offline, diffusers needs the "
                "SDXL configs once; load any SDXL diffusers model online first, or use a diffusers folder."
            ) from None
    else:
        raise ValueError(f"source {source.kind} must be materialized before loading")
    pipe.set_progress_bar_config(disable=True)
    total, largest = pipeline_bytes(pipe)
    return LoadedModel(pipe, total, largest, weights if weights.is_file() else None)


def load_tagger(source: ModelSource, dtype, device: str, progress: Progress = _noop) -> LoadedModel:
    """A WD tagger as an onnxruntime session on the execution device's provider."""
    from studio.captioning.tagger import Tagger, default_providers

    progress(None, f"loading the tagger {source.name}")
    tagger = Tagger.load(Path(source.location), default_providers(device))
    return LoadedModel(tagger, tagger.size_bytes, tagger.size_bytes, tagger.model_file)


def load_vlm(source: ModelSource, dtype, device: str, progress: Progress = _noop) -> LoadedModel:
    """A vision-language captioner through transformers, on the execution device."""
    from studio.captioning.nl_caption import TransformersVLMBackend

    progress(None, f"loading the captioning model {source.name}")
    backend = TransformersVLMBackend(source.location, device=device)
    backend.load()
    size = backend.size_bytes
    return LoadedModel(backend, size, size, None)


def load_anima(source: ModelSource, dtype, device: str, progress: Progress = _noop) -> LoadedModel:
    """Load a materialized Anima diffusers folder into RAM as an AnimaModularPipeline.

    The modular pipeline reads modular_model_index.json, then `load_components` loads each
    component from the folder. It only logs a component that fails to load and leaves it None,
    so every component is checked here and a missing one is reported by name.
    ComfyUI's split files (diffusion model + Qwen3 text encoder + Qwen-Image VAE) load through
    studio.models.anima_comfy, with the configs `materialize` found for them.
    """
    from diffusers import AnimaModularPipeline

    from studio.models.anima_compat import GUIDER_LOGGER, ensure_cosmos_resize, quiet_logger
    from studio.models.vram import pipeline_bytes

    if source.kind == "single_file":
        return _load_anima_comfy(source, dtype, progress)
    if source.kind != "folder":
        raise ValueError(f"source {source.kind} must be materialized before loading")
    if source.vae:
        raise ModelNotFoundError("a separate VAE is not supported for Anima: it uses the Qwen-Image VAE in its folder")
    ensure_cosmos_resize()  # the DiT's forward needs torchvision's resize otherwise
    quiet_library_progress_bars()
    folder = Path(source.location)
    _check_pipeline_class(folder, "anima")
    progress(None, f"loading {source.name}")
    with quiet_logger(GUIDER_LOGGER):  # the pipeline makes its default guider
        pipe = AnimaModularPipeline.from_pretrained(str(folder))
    pipe.load_components(  # per component: tokenizers and the scheduler take neither argument
        dtype={name: dtype for name in ANIMA_WEIGHTED},
        use_safetensors={name: True for name in ANIMA_WEIGHTED},
    )
    missing = [name for name in ANIMA_COMPONENTS if getattr(pipe, name, None) is None]
    if missing:
        raise ModelNotFoundError(
            f"{folder.name}: {', '.join(missing)} could not be loaded (missing from the folder, or "
            f"unreadable: the log says why). {ANIMA_LAYOUT}."
        )
    total, largest = pipeline_bytes(pipe)
    return LoadedModel(pipe, total, largest, _anima_weights_file(folder))


def _load_anima_comfy(source: ModelSource, dtype, progress: Progress) -> LoadedModel:
    """ComfyUI's three Anima files, converted into the components of an AnimaModularPipeline."""
    from diffusers import AnimaModularPipeline

    from studio.models.anima_comfy import find_files, load_components
    from studio.models.anima_compat import GUIDER_LOGGER, ensure_cosmos_resize, quiet_logger
    from studio.models.vram import pipeline_bytes

    if not source.config:
        raise ValueError("an Anima single file must be materialized (its configs found) before loading")
    ensure_cosmos_resize()
    quiet_library_progress_bars()
    files = find_files(Path(source.location), source.vae)
    progress(None, f"loading {source.name} ({files.dit.name}, {files.text_encoder.name}, {files.vae.name})")
    components = load_components(files, Path(source.config), dtype)
    with quiet_logger(GUIDER_LOGGER):
        pipe = AnimaModularPipeline.from_pretrained(source.config)
    pipe.update_components(**components)
    total, largest = pipeline_bytes(pipe)
    return LoadedModel(pipe, total, largest, files.dit)


def _anima_weights_file(folder: Path) -> Path | None:
    """The DiT's weights identify an Anima model in infotext ("Model hash"), as the UNet does for SDXL."""
    weights = sorted((folder / "transformer").glob("*.safetensors"))
    return weights[0] if len(weights) == 1 else None


LOADERS = {"sdxl": load_sdxl, "anima": load_anima, "tagger": load_tagger, "vlm": load_vlm}


def load_model(source: ModelSource, models_dir: Path, dtype, device: str, progress: Progress = _noop) -> LoadedModel:
    local = materialize(source, models_dir, progress)
    if local.family != source.family:
        # The manager keeps the record under the source it was asked for, and runs and places
        # the model by that family: a model of another family must be asked for as such.
        raise ModelNotFoundError(
            f"{source.name} is {a(PIPELINE_CLASSES.get(local.family, local.family))} model, not "
            f"{source.family}: give its folder path ({local.location}) instead"
        )
    try:
        loader = LOADERS[local.family]
    except KeyError:
        raise ModelNotFoundError(f"no loader for model family {local.family!r}") from None
    return loader(local, dtype, device, progress)
