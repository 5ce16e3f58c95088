"""The LoRA stack of one diffusers pipeline (SDXL or Anima): which LoRA files are active, at what weight.

`LoraStack.apply(specs)` makes the pipeline's adapters match a list of LoraSpec (path + weight):
each file is checked first (exists, is safetensors, is for this model family), loaded once as a
named adapter (reloaded when the file changes on disk), verified to have landed on this model's
layers, and weighted with `set_adapters`. Adapters no longer listed are deleted; an empty stack
removes every LoRA layer, which restores the base model's output exactly.

diffusers drops the DoRA magnitudes (`dora_scale`) of kohya files with only a log warning, which
would silently turn a DoRA into a different plain LoRA. Such files are converted here into the
peft layout diffusers does load (`lora_magnitude_vector`), with kohya's alpha / rank baked in.

Anima (AnimaModularPipeline, LoRA-bearing components `transformer` and `text_conditioner`):
diffusers loads the ComfyUI / diffusion-pipe layout (`diffusion_model.blocks.N...lora_A/lora_B`,
no alpha) and its own layout (`transformer.` / `text_conditioner.` keys) exactly, but it loads
kohya files (`lora_unet_blocks_0_...`, lora_down/lora_up/alpha) and un-prefixed
`save_lora_adapter` files without error while changing nothing. Those are converted here into
the ComfyUI layout (alpha / rank baked into lora_B) first; every load is then verified to have
landed on layers, so a file that would be a silent no-op is reported instead.

Importing this module does no work; torch and diffusers are used only through the pipeline.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import LoraError
from studio.models.lora_format import (
    KOHYA_PREFIXES,
    LoraInfo,
    check_lora_path,
    diffusers_to_sgm_unet_name,
    inspect_lora,
    kohya_lora_name,
    text_encoder_kohya_path,
)
from studio.wording import a

if TYPE_CHECKING:  # pragma: no cover - typing only
    from studio.schemas import LoraSpec

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # SDXL's
LORA_COMPONENTS_BY_FAMILY = {
    "sdxl": LORA_COMPONENTS,
    "sd1": ("unet", "text_encoder"),
    "sd2": ("unet", "text_encoder"),
    "anima": ("transformer", "text_conditioner"),
}
FAMILY_LABELS = {
    "sdxl": "SDXL (Animagine XL, Pony, Illustrious, ...)",
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "anima": "Anima",
    "flux": "Flux",
}


@dataclass(frozen=True)
class AppliedLora:
    """One active LoRA, as infotext records it (`Lora hashes: "name: hash"`)."""

    name: str  # the file's stem, as A1111 names LoRAs
    path: Path
    weight: float
    lora_hash: str  # first 12 hex of the file's hash (see studio.generation.infotext.lora_hash)
    adapter_name: str

    @property
    def hash(self) -> str:
        return self.lora_hash


@dataclass
class _Adapter:
    """A file loaded into the pipeline under `adapter_name`, and the file version it came from."""

    adapter_name: str
    path: Path
    version: tuple[int, int]  # (size, mtime_ns): a changed file is reloaded
    info: LoraInfo
    lora_hash: str  # of the version loaded, for infotext


class LoraStack:
    """The LoRA adapters of one pipeline. Not thread-safe: the GPU lane runs one job at a time."""

    def __init__(self, pipe: Any, family: str = "sdxl"):
        self.pipe = pipe
        self.family = family
        self.components = LORA_COMPONENTS_BY_FAMILY.get(family, LORA_COMPONENTS)
        if family == "anima":  # its Qwen3 text encoder: diffusers' Anima loader has no LoRA for it
            self.components = (*self.components, "text_encoder")
        self._loaded: dict[Path, _Adapter] = {}
        self._active: list[tuple[_Adapter, float]] = []
        self._counter = 0

    # -- public --------------------------------------------------------------------------------
    def apply(self, specs: Sequence[LoraSpec]) -> list[str]:
        """Make the pipeline's LoRAs exactly `specs`; returns warnings for the user (may be empty).

        Every file is checked before the pipeline is touched; if a load fails, the LoRAs
        that were active before stay active and the error says which file and why.
        """
        # 1. Check every file: exists, safetensors, this model family, listed once.
        wanted = [(self._check(spec.path), spec.weight) for spec in specs]
        seen: set[Path] = set()
        for (path, _info), _weight in wanted:
            if path in seen:
                raise LoraError(f"{path.name} is in the LoRA list twice: list it once and set its weight")
            seen.add(path)

        # 2. Load what is new or changed on disk; on failure roll back to the previous stack.
        user_warnings: list[str] = []
        fresh: list[_Adapter] = []
        stack: list[tuple[_Adapter, float]] = []
        try:
            for (path, info), weight in wanted:
                adapter = self._loaded.get(path)
                if adapter is None or adapter.version != _file_version(path):
                    adapter = self._load(path, info, user_warnings)
                    fresh.append(adapter)
                stack.append((adapter, weight))
        except LoraError:
            for adapter in fresh:
                self._delete(adapter.adapter_name)
            self._activate(self._active)
            raise

        # 3. Delete adapters that are no longer listed (or whose file was replaced).
        keep = {adapter.adapter_name for adapter, _ in stack}
        for path, adapter in list(self._loaded.items()):
            if adapter.adapter_name not in keep:
                self._delete(adapter.adapter_name)
                del self._loaded[path]
        for adapter in fresh:
            self._loaded[adapter.path] = adapter

        # 4. Weight the stack, or remove every LoRA layer when it is empty.
        self._activate(stack)
        self._active = stack
        return user_warnings

    def clear(self) -> None:
        """Remove every LoRA: the pipeline computes exactly what the base model does."""
        self.apply([])

    def applied(self) -> list[AppliedLora]:
        """The active LoRAs in stack order, each with its infotext hash."""
        return [
            AppliedLora(adapter.path.stem, adapter.path, weight, adapter.lora_hash, adapter.adapter_name)
            for adapter, weight in self._active
        ]

    # -- checking ------------------------------------------------------------------------------
    def _check(self, path_text: str) -> tuple[Path, LoraInfo]:
        path = check_lora_path(path_text).resolve()
        info = inspect_lora(path)
        if info.family not in (self.family, "unknown"):
            raise LoraError(
                f"{path.name} is {a(FAMILY_LABELS.get(info.family, info.family))} LoRA, but this model is "
                f"{FAMILY_LABELS.get(self.family, self.family)}: pick a LoRA trained for this model"
            )
        if info.format == "lycoris":
            raise LoraError(
                f"{path.name} is a LyCORIS (LoHa/LoKr/OFT) file; only LoRA files (lora_down/lora_up or "
                f"lora_A/lora_B) can be loaded into {FAMILY_LABELS.get(self.family, self.family)} here"
            )
        if info.has_dora and self.family == "anima":
            raise LoraError(
                f"{path.name} is a DoRA; DoRA files cannot be loaded into Anima here yet "
                "(diffusers would drop their magnitudes and apply a different LoRA)"
            )
        if info.modules == 0:
            raise LoraError(f"{path.name} holds no lora_down/lora_A weights: it is not a LoRA file")
        return path, info

    # -- loading -------------------------------------------------------------------------------
    def _load(self, path: Path, info: LoraInfo, user_warnings: list[str]) -> _Adapter:
        self._counter += 1
        adapter_name = f"lora{self._counter}_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)[:40]}"
        version = _file_version(path)
        source: Any = str(path)
        if self.family == "anima":
            source = _anima_source(self.pipe, path, info)
        elif info.has_dora and info.format == "kohya":
            source = _kohya_dora_to_diffusers(self.pipe, path)
        no_match = LoraError(
            f"{path.name} matches none of this model's layers; it changes nothing "
            "(is it for another model, or saved with layer names this loader does not know?)"
        )
        text_encoder: dict = {}
        if self.family == "anima":
            source, text_encoder = _anima_text_encoder_part(self.pipe, path, source)
        try:
            with _quiet_expected_peft_warnings():
                if source:
                    self.pipe.load_lora_weights(source, adapter_name=adapter_name)
                if text_encoder:
                    _load_text_encoder_lora(self.pipe.text_encoder, text_encoder, adapter_name)
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            from peft import NoMatchingPeftModuleError

            self._delete(adapter_name)
            if isinstance(exc, NoMatchingPeftModuleError):
                raise no_match from exc
            raise LoraError(
                f"{path.name} could not be loaded into this model ({_first_line(exc)}); it may be for "
                "another model or use layer names diffusers does not understand"
            ) from exc

        self._detach_from_file(adapter_name)
        landed = self._count_layers(adapter_name)
        if landed == 0:
            self._delete(adapter_name)
            raise no_match
        if landed < info.modules:
            user_warnings.append(
                f"{path.name}: only {landed} of its {info.modules} layers match this model; "
                "the rest are ignored, so it may not look as intended"
            )
        if not info.has_dora and self._all_up_weights_zero(adapter_name):
            user_warnings.append(
                f"{path.name}: all its up weights are zero, so it changes nothing (an untrained LoRA?)"
            )
        return _Adapter(adapter_name, path, version, info, _lora_hash(path))

    def _tuner_layers(self, adapter_name: str):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for component in self.components:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {}):
                    yield module

    def _detach_from_file(self, adapter_name: str) -> None:
        """Give the adapter's CPU tensors their own memory. safetensors memory-maps the file and
        peft adopts those tensors as they are, so a file rewritten in place (a copy over it, a
        trainer saving the same name) would crash the process (SIGBUS) at the next generation."""
        for layer in self._tuner_layers(adapter_name):
            for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
                container = getattr(layer, part, None)
                if container is None or adapter_name not in container:
                    continue
                for param in container[adapter_name].parameters():
                    if param.device.type == "cpu":
                        param.data = param.data.clone()

    def _count_layers(self, adapter_name: str) -> int:
        return sum(1 for _ in self._tuner_layers(adapter_name))

    def _all_up_weights_zero(self, adapter_name: str) -> bool:
        layers = self._tuner_layers(adapter_name)
        return not any(bool(layer.lora_B[adapter_name].weight.detach().any()) for layer in layers)

    # -- adapters ------------------------------------------------------------------------------
    def _adapter_names(self) -> set[str]:
        names: set[str] = set()
        for component_adapters in self.pipe.get_list_adapters().values():
            names.update(component_adapters)
        return names

    def _text_encoder_adapters(self) -> set[str]:
        model = getattr(self.pipe, "text_encoder", None) if self.family == "anima" else None
        return set(getattr(model, "peft_config", {}) or {}) if model is not None else set()

    def _delete(self, adapter_name: str) -> None:
        if adapter_name in self._adapter_names():
            with _quiet_expected_peft_warnings():
                self.pipe.delete_adapters(adapter_name)
        if adapter_name in self._text_encoder_adapters():
            from diffusers.utils.peft_utils import delete_adapter_layers

            delete_adapter_layers(self.pipe.text_encoder, adapter_name)

    def _activate(self, stack: list[tuple[_Adapter, float]]) -> None:
        if stack:
            in_pipe, in_text_encoder = self._adapter_names(), self._text_encoder_adapters()
            piped = [(a.adapter_name, float(w)) for a, w in stack if a.adapter_name in in_pipe]
            if piped:
                self.pipe.set_adapters([name for name, _ in piped], [w for _, w in piped])
            if in_text_encoder:
                from diffusers.utils.peft_utils import set_weights_and_activate_adapters

                encoded = [(a.adapter_name, float(w)) for a, w in stack if a.adapter_name in in_text_encoder]
                set_weights_and_activate_adapters(self.pipe.text_encoder, [n for n, _ in encoded],
                                                  [w for _, w in encoded])
        elif self._has_lora_layers():
            self.pipe.unload_lora_weights()  # removes the peft layers: base output, bit for bit
            if self.family == "anima" and getattr(self.pipe, "text_encoder", None) is not None:
                from diffusers.utils.peft_utils import recurse_remove_peft_layers

                recurse_remove_peft_layers(self.pipe.text_encoder)
                self.pipe.text_encoder.peft_config = {}

    def _has_lora_layers(self) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(
            isinstance(module, BaseTunerLayer)
            for component in self.components
            if getattr(self.pipe, component, None) is not None
            for module in getattr(self.pipe, component).modules()
        )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _file_version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


_EXPECTED_PEFT_WARNINGS = (
    "Already found a `peft_config` attribute",  # a second adapter on one model
    "Adapter .* was active which is now deleted",  # deleting a LoRA that left the stack
)


@contextmanager
def _quiet_expected_peft_warnings() -> Iterator[None]:
    """peft warns about what a stack does on purpose: a second adapter on one model, deleting
    the active adapter. Only those two messages are silenced."""
    with warnings.catch_warnings():
        for message in _EXPECTED_PEFT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _lora_hash(path: Path) -> str:
    from studio.generation.infotext import lora_hash

    return lora_hash(path)


def _kohya_module_names(pipe: Any) -> dict[str, tuple[str, str]]:
    """{kohya lora name: (component, diffusers module path)} for every Linear/Conv2d the
    pipeline has, using the same naming as `save_kohya_lora`."""
    import torch

    layers_per_block = pipe.unet.config.layers_per_block
    names: dict[str, tuple[str, str]] = {}
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module_path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in module_path:
                continue
            module_path = module_path.removesuffix(".base_layer")
            prefix = KOHYA_PREFIXES[component]
            if component == "unet":
                names[kohya_lora_name(prefix, module_path)] = (component, module_path)  # diffusers-named
                try:
                    kohya_path = diffusers_to_sgm_unet_name(module_path, layers_per_block=layers_per_block)
                except LoraError:
                    continue
            else:
                kohya_path = text_encoder_kohya_path(module_path)
            names[kohya_lora_name(prefix, kohya_path)] = (component, module_path)
    return names


def dora_per_input(magnitude, up, down) -> bool:
    """Whether a `dora_scale` holds one magnitude per input column (LyCORIS `wd_on_out=False`,
    shape [1, in(, 1, 1)]) rather than per output row ([out, 1(, 1, 1)]): told by which axis is
    1, so a square layer is not misread."""
    out_features, in_features = up.shape[0], down.shape[1]
    if magnitude.dim() < 2:
        return magnitude.numel() != out_features and magnitude.numel() == in_features
    return magnitude.shape[0] == 1 and magnitude.shape[1] == in_features and out_features != 1


def _per_input_dora_as_lora(prefix: str, weight, down, up, magnitude) -> dict:
    """A per-input DoRA layer (LyCORIS `wd_on_output=False`) as an exact LoRA of full rank.

    peft's DoRA keeps one magnitude per output row only, so the layer's whole change is computed
    here as LyCORIS does: merged = W + up @ down, each input column scaled to its magnitude,
    `delta = merged * m / ||merged column|| - W`. It is written as lora_B @ lora_A with one factor
    the identity (rank = the smaller side), so the stack's weight scales it linearly, as ComfyUI's
    strength does. Costs as much memory as the layer's own weight."""
    import torch

    weight = weight.detach().float()
    up, down = up.to(weight.device), down.to(weight.device)
    merged = weight + (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape)
    columns = merged.transpose(0, 1).reshape(merged.shape[1], -1)
    norm = columns.norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2)) + torch.finfo(torch.float32).eps
    delta = merged * (magnitude.float().reshape(norm.shape) / norm) - weight
    out_features = weight.shape[0]
    if weight.dim() == 2 and weight.shape[1] < out_features:  # Linear, narrower input: A = I
        lora_a, lora_b = torch.eye(weight.shape[1]), delta
    else:  # A = delta (a Conv2d keeps its kernel in A), B = I (1x1 for a Conv2d)
        lora_a, lora_b = delta, torch.eye(out_features).reshape(out_features, out_features, *[1] * (weight.dim() - 2))
    return {f"{prefix}.lora_A.weight": lora_a.to("cpu", down.dtype), f"{prefix}.lora_B.weight": lora_b.to("cpu", down.dtype)}


def _kohya_dora_to_diffusers(pipe: Any, path: Path) -> dict:
    """A kohya DoRA file as the peft-layout dict diffusers loads with its magnitudes:
    `{component}.{module}.lora_A.weight` / `lora_B.weight` (alpha / rank baked into B) /
    `lora_magnitude_vector` (peft's shape: [out] for Linear, [1, out, 1, 1] for Conv2d). A
    per-input DoRA (`dora_scale` [1, in]) becomes the exact full-rank LoRA of its change instead."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    targets = _kohya_module_names(pipe)
    axes = {dora_per_input(tensors[key], tensors[key.replace(".dora_scale", ".lora_up.weight")],
                           tensors[key.replace(".dora_scale", ".lora_down.weight")])
            for key in tensors if key.endswith(".dora_scale")
            and key.replace(".dora_scale", ".lora_up.weight") in tensors
            and key.replace(".dora_scale", ".lora_down.weight") in tensors}
    if len(axes) > 1:
        raise LoraError(f"{path.name} mixes per-output ([out, 1]) and per-input ([1, in]) dora_scale tensors; "
                        "DoRA files are one or the other")
    converted = {}
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        lora_name = key.removesuffix(".lora_down.weight")
        if lora_name not in targets:
            continue  # not on this model: counted as unmatched after loading
        component, module_path = targets[lora_name]
        down, up = tensors[key], tensors.get(f"{lora_name}.lora_up.weight")
        if up is None:
            raise LoraError(f"{path.name} is corrupt: {lora_name} has a lora_down weight but no lora_up")
        alpha = tensors.get(f"{lora_name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        prefix = f"{component}.{module_path}"
        magnitude = tensors.get(f"{lora_name}.dora_scale")
        if magnitude is not None and dora_per_input(magnitude, up, down):
            base = getattr(pipe, component).get_submodule(module_path)
            base = getattr(base, "base_layer", base)
            converted.update(_per_input_dora_as_lora(prefix, base.weight, down, up * scale, magnitude))
            continue
        converted[f"{prefix}.lora_A.weight"] = down
        converted[f"{prefix}.lora_B.weight"] = up * scale
        if magnitude is not None:
            shape = (1, -1, 1, 1) if down.dim() == 4 else (-1,)
            converted[f"{prefix}.lora_magnitude_vector"] = magnitude.reshape(shape)
    if not converted:
        raise LoraError(f"{path.name} matches none of this model's layers; it changes nothing")
    return converted


_ANIMA_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$")


def _anima_modules(pipe: Any) -> dict[str, tuple[str, str]]:
    """{module path as files name it: (component, diffusers module path)} for every Linear of
    Anima's transformer and text conditioner, under the names files use: kohya
    (`lora_unet_blocks_0_self_attn_q_proj`, and the diffusers-named `lora_unet_transformer_blocks_...`),
    ComfyUI (`diffusion_model.blocks.0.self_attn.q_proj`) and un-prefixed diffusers paths
    (`transformer_blocks.0.attn1.to_q`, as `save_lora_adapter` writes them)."""
    import torch

    from studio.models.lora_format import ANIMA_KOHYA_PREFIX, anima_original_path

    names: dict[str, tuple[str, str]] = {}
    for component in LORA_COMPONENTS_BY_FAMILY["anima"]:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module_path, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or ".lora_" in module_path:
                continue
            module_path = module_path.removesuffix(".base_layer")
            original = anima_original_path(component, module_path)
            names[kohya_lora_name(ANIMA_KOHYA_PREFIX, original)] = (component, module_path)
            if component == "transformer":
                names.setdefault(kohya_lora_name(ANIMA_KOHYA_PREFIX, module_path), (component, module_path))
            names.setdefault(module_path, (component, module_path))
    return names


def _anima_needs_conversion(keys: Sequence[str], info: LoraInfo) -> bool:
    """Whether diffusers would load this Anima file wrongly or not at all as it is: kohya names,
    lora_down/lora_up or alpha keys (diffusers reads neither), or keys without a component prefix."""
    if info.format == "kohya":
        return True
    if any(k.endswith((".alpha", ".lora_down.weight", ".lora_up.weight")) for k in keys):
        return True
    prefixes = ("diffusion_model.", "transformer.", "text_conditioner.")
    return not all(k.startswith(prefixes) for k in keys)


def _anima_source(pipe: Any, path: Path, info: LoraInfo) -> Any:
    """What to hand `load_lora_weights` for an Anima file: the path itself where diffusers reads
    the layout right (ComfyUI lora_A/lora_B without alpha, diffusers `transformer.` keys), or
    else the file converted into diffusers' layout, alpha / rank baked into lora_B."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if not _anima_needs_conversion(keys, info):
        return str(path)

    from safetensors.torch import load_file

    tensors = load_file(str(path))
    grouped: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _ANIMA_LORA_KEY.match(key)
        if match:
            part = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up",
                    "lora_B.weight": "up", "alpha": "alpha"}[match["part"]]
            grouped.setdefault(match["module"], {})[part] = tensor
    targets = _anima_modules(pipe)
    converted = {}
    for name, parts in grouped.items():
        if "down" not in parts:
            continue
        if "up" not in parts:
            raise LoraError(f"{path.name} is corrupt: {name} has a lora_down/lora_A weight but no lora_up/lora_B")
        down, up = parts["down"], parts["up"]
        scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
        if name.startswith(("diffusion_model.", "transformer.", "text_conditioner.")):
            prefix = name  # already in a layout diffusers maps; only lora_down/up/alpha needed fixing
        elif name in targets:
            component, module_path = targets[name]
            prefix = f"{component}.{module_path}"
        else:
            continue  # not on this model: counted as unmatched after loading
        converted[f"{prefix}.lora_A.weight"] = down
        converted[f"{prefix}.lora_B.weight"] = up * scale if scale != 1.0 else up
    if not converted:
        raise LoraError(
            f"{path.name} matches none of this model's layers; it changes nothing "
            "(is it for another model, or saved with layer names this loader does not know?)"
        )
    return converted


ANIMA_TEXT_ENCODER_PREFIXES = ("text_encoders.qwen3_06b.transformer.model.",  # ComfyUI (and our files)
                               "text_encoders.qwen3_06b.transformer.",
                               "text_encoder.")  # diffusers' component name
_TE_PARTS = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
             "alpha": "alpha"}


def _anima_text_encoder_part(pipe: Any, path: Path, source: Any) -> tuple[Any, dict]:
    """Split an Anima file into what diffusers loads (the DiT and LLM adapter: `source` without
    text-encoder keys, or None when nothing is left) and the Qwen3 text encoder's LoRA as
    {module path: (down, up with alpha / rank baked in)}: ComfyUI's
    `text_encoders.qwen3_06b.transformer.model.<module>` and sd-scripts' `lora_te_<module_with_underscores>`."""
    import torch
    from safetensors.torch import load_file

    model = getattr(pipe, "text_encoder", None)
    if model is None:
        return source, {}
    tensors = load_file(str(path))
    flat = {}
    for module_path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in module_path:
            module_path = module_path.removesuffix(".base_layer")
            for name in (module_path, f"model.{module_path}"):
                flat["lora_te_" + name.replace(".", "_")] = module_path
    grouped: dict[str, dict] = {}
    rest = {}
    for key, tensor in tensors.items():
        module, part = None, None
        for suffix, short in _TE_PARTS.items():
            if key.endswith("." + suffix):
                name = key[: -len(suffix) - 1]
                prefix = next((p for p in ANIMA_TEXT_ENCODER_PREFIXES if name.startswith(p)), None)
                module = name[len(prefix):] if prefix else flat.get(name)
                part = short
                break
        if module is None:
            rest[key] = tensor
        else:
            grouped.setdefault(module, {})[part] = tensor
    if not grouped:
        return source, {}
    if isinstance(source, str):  # diffusers would read the file whole: hand it the rest only
        source = rest or None
    lora = {}
    for module, parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{path.name} is corrupt: the text encoder's {module} lacks its down or up weight")
        scale = float(parts["alpha"]) / parts["down"].shape[0] if "alpha" in parts else 1.0
        lora[module] = (parts["down"], parts["up"] * scale if scale != 1.0 else parts["up"])
    return source, lora


def _load_text_encoder_lora(model: Any, lora: dict, adapter_name: str) -> None:
    """Add `lora` ({module path: (down, up)}) to the text encoder as the peft adapter `adapter_name`."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    known = {name for name, _ in model.named_modules()}
    matched = {module: pair for module, pair in lora.items() if module in known}
    if not matched:
        return
    ranks = {module: down.shape[0] for module, (down, _) in matched.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(matched),
                        rank_pattern={m: r for m, r in ranks.items() if r != rank},
                        alpha_pattern={m: r for m, r in ranks.items() if r != rank})
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    state = {}
    for module, (down, up) in matched.items():
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = down, up
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)


def import_lora_file(source: Path, loras_dir: Path) -> Path:
    """Copy an uploaded LoRA into the workspace's loras folder after checking it is a readable
    safetensors LoRA. Never overwrites: a name already taken gets a numbered suffix."""
    import shutil

    from studio.fileio import atomic_path
    from studio.models.lora_format import inspect_lora

    info = inspect_lora(source)
    if info.modules == 0:
        raise LoraError(f"{source.name} has no LoRA layers (no lora_down/lora_A weights)")
    loras_dir.mkdir(parents=True, exist_ok=True)
    target = loras_dir / source.name
    number = 1
    while target.exists():
        target = loras_dir / f"{source.stem} ({number}){source.suffix}"
        number += 1
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target
