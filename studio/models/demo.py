"""Tiny random-weight demo models, built offline from configs with a fixed seed.

Model weights cannot be downloaded in tests, on CI or in demo mode, yet the real loading code
(diffusers folders, single .safetensors checkpoints) must be exercised. This module builds a tiny
SDXL with the real model's *shape*: two CLIP text encoders of different widths, a UNet with SDXL's
block layout and "text_time" conditioning, and a VAE that downscales by 8, so that the app can use
real resolutions (1024x1024 -> 128x128 latents) while staying fast on a CPU.

`build_demo_sdxl_pipeline(seed)` builds the pipeline in memory. `ensure_demo_sdxl(cache_dir)`
writes it once into a models cache, both as a diffusers folder and as one single-file checkpoint
in the original SGM layout (what Animagine XL and every other SDXL fine-tune ship as).

Importing this module does no work: torch, diffusers and transformers are imported inside the
functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from studio.fileio import folder_is_complete, write_complete_folder
from studio.models.sgm_convert import sdxl_pipeline_to_sgm

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

# ---------------------------------------------------------------------------------------------
# Sizes of the tiny SDXL. Real SDXL: CLIP-L 768 wide, OpenCLIP bigG 1280 wide with a 1280
# projection, UNet (320, 640, 1280), addition_time_embed_dim 256, VAE (128, 256, 512, 512).
# ---------------------------------------------------------------------------------------------
TE1_HIDDEN = 32
TE2_HIDDEN = 64
TE2_PROJECTION = 32
TIME_EMBED_DIM = 8
MAX_TOKENS = 77
NUM_MERGES = 800  # the learner stops early (~760) once every corpus word is one token

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
TE2_PAD_TOKEN = "!"  # real SDXL's tokenizer_2 pads with "!", tokenizer (CLIP-L) with <|endoftext|>

# Common booru / Animagine prompt words: the BPE merges are learned from these so that typical
# anime prompts tokenise into a realistic number of tokens (a word or two per token).
_CORPUS = """
1girl 1boy 2girls 2boys multiple girls solo solo focus looking at viewer looking back looking away
smile open mouth closed mouth closed eyes blush grin smug expressionless crying tears
long hair short hair medium hair very long hair twintails ponytail side ponytail braid bangs
blunt bangs sidelocks ahoge hair between eyes hair ornament hair ribbon hair bow hairclip
black hair blonde hair brown hair blue hair red hair pink hair purple hair white hair silver hair
green hair grey hair aqua hair orange hair multicolored hair streaked hair gradient hair
blue eyes red eyes green eyes brown eyes purple eyes yellow eyes pink eyes aqua eyes heterochromia
masterpiece best quality great quality good quality normal quality low quality worst quality
very aesthetic aesthetic displeasing very displeasing absurdres highres lowres newest recent
mid early oldest safe sensitive nsfw explicit rating general questionable
hatsune miku vocaloid kagamine rin kagamine len megurine luka touhou hakurei reimu kirisame marisa
genshin impact honkai star rail blue archive fate grand order arknights hololive original
school uniform serafuku sailor collar pleated skirt skirt shirt white shirt jacket hoodie dress
sweater necktie ribbon bow thighhighs pantyhose socks kneehighs shoes boots gloves hat beret
long sleeves short sleeves sleeveless detached sleeves bare shoulders collarbone hand up hands up
outdoors indoors sky cloud blue sky day night sunset starry sky moon sun tree flower cherry blossoms
petals grass water ocean beach city street building window classroom bedroom room rain snow
standing sitting lying walking running upper body full body cowboy shot portrait close up
from side from behind from above from below simple background white background
holding holding weapon holding sword sword weapon gun book cup umbrella bag phone
animal ears cat ears fox ears wings tail horns halo glasses jewelry earrings necklace choker
breasts small breasts medium breasts large breasts navel thighs legs feet arms hand fingers
depth of field blurry background bokeh light particles sunlight lens flare backlighting shadow
anime coloring illustration official art game cg sketch lineart monochrome greyscale colorful
watermark signature text error jpeg artifacts bad anatomy bad hands extra digits fewer digits
missing fingers cropped artist name username chromatic aberration scan abstract unfinished
a an the of in on at with and or is are her his their girl boy woman man photo picture cat dog
""".split()


@dataclass(frozen=True)
class DemoSDXL:
    """Where `ensure_demo_sdxl` wrote the demo model."""

    folder: Path  # diffusers layout: model_index.json, unet/, vae/, text_encoder/, ...
    single_file: Path  # one original-SGM-layout .safetensors checkpoint


# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE with merges learned from the corpus above.
# ---------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return dict(sorted(mapping.items()))


# CLIP's pre-tokenizer splits into letter runs, single digits and punctuation runs.
_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def learn_merges(splits: dict[str, list[str]], word_counts: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """A tiny, deterministic BPE learner: repeatedly merge the most frequent adjacent pair of
    symbols in `splits` (word -> symbols), counting each word `word_counts[word]` times. Ties are
    broken by the pair itself so the result never depends on dict ordering."""
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    return merges


def _learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """CLIP-style merges: words split CLIP's way, a `</w>` marker on each word's last symbol."""
    word_counts = Counter(piece for word in words for piece in _WORD_RE.findall(word.lower()))
    splits = {word: [*word[:-1], word[-1] + "</w>"] for word in word_counts}
    return learn_merges(splits, word_counts, num_merges)


def _write_clip_tokenizer_files(folder: Path, num_merges: int = NUM_MERGES) -> None:
    """Write vocab.json and merges.txt in CLIP's layout (same id order as openai/clip-vit-large)."""
    byte_chars = list(_bytes_to_unicode().values())
    merges = _learn_bpe_merges(_CORPUS, num_merges)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_demo_clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(tokenizer, tokenizer_2) sharing one vocabulary; the second pads with "!" like SDXL's."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="demo-clip-tok-") as tmp:
        _write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)
        tokenizer_2 = CLIPTokenizer.from_pretrained(
            tmp, model_max_length=MAX_TOKENS, pad_token=TE2_PAD_TOKEN
        )
    return tokenizer, tokenizer_2


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------
def _clip_text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,  # real SDXL: 1024 px / 8
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_PROJECTION,
        norm_num_groups=16,
    )


def _build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # 4 levels: downscale factor 8 like SDXL
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=False,
    )


def _build_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def build_demo_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny random-weight SDXL pipeline, built offline; the same seed gives the same weights.

    Each component is initialised under its own seed derived from `seed`, so adding or reordering
    components never changes the others' weights.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_demo_clip_tokenizers()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, TE1_HIDDEN, layers=2, heads=4))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, TE2_HIDDEN, layers=3, heads=4, projection_dim=TE2_PROJECTION)
    )
    torch.manual_seed(seed + 2)
    unet = _build_unet()
    torch.manual_seed(seed + 3)
    vae = _build_vae()

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    for model in (text_encoder, text_encoder_2, unet, vae):
        model.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# The demo model in a models cache
# ---------------------------------------------------------------------------------------------
DEMO_SDXL_NAME = "demo-sdxl"
DEMO_SDXL_SEED = 0
DEMO_FORMAT_VERSION = 1  # bump when the demo's configs change: older caches are then rebuilt
def _write_single_file(pipe, path: Path) -> None:
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.title": "Anime LoRA Studio demo SDXL (tiny, random weights)",
        "modelspec.resolution": "1024x1024",
        "studio.demo_seed": str(DEMO_SDXL_SEED),
        "studio.demo_version": str(DEMO_FORMAT_VERSION),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(sdxl_pipeline_to_sgm(pipe), str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_folder(pipe, folder: Path) -> None:
    marker = {"version": DEMO_FORMAT_VERSION, "seed": DEMO_SDXL_SEED}
    write_complete_folder(folder, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), marker)


def ensure_demo_sdxl(cache_dir: Path) -> DemoSDXL:
    """Write the demo SDXL into `cache_dir` once; later calls return the paths without writing.

    Writes `cache_dir/demo-sdxl/` (diffusers layout) and `cache_dir/demo-sdxl.safetensors` (one
    SGM-layout checkpoint of the same weights). A folder without its marker file (a crash midway)
    or from an older demo version is rebuilt.

    The single file is a real SGM checkpoint, but diffusers cannot tell which model it is from its
    tiny keys (it looks for full-size SDXL layer names and would fetch configs from the hub), so
    load it the documented offline way: `from_single_file(path, config=str(folder))`, where the
    folder supplies the component configs, tokenizers and scheduler.
    """
    cache_dir = Path(cache_dir)
    demo = DemoSDXL(
        folder=cache_dir / DEMO_SDXL_NAME,
        single_file=cache_dir / f"{DEMO_SDXL_NAME}.safetensors",
    )
    if demo.single_file.is_file() and folder_is_complete(demo.folder, DEMO_FORMAT_VERSION):
        return demo
    cache_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_demo_sdxl_pipeline(DEMO_SDXL_SEED)
    _write_single_file(pipe, demo.single_file)
    if folder_is_complete(demo.folder, DEMO_FORMAT_VERSION):  # only the single file was missing
        return demo
    _write_folder(pipe, demo.folder)  # last: its marker says both are complete
    return demo
