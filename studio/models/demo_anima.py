"""demo-anima: a tiny random-weight Anima, built offline from configs with a fixed seed.

Anima runs in diffusers as `AnimaModularPipeline` with seven components: a Qwen3 text encoder and
its Qwen2 tokenizer, a T5 tokenizer (only its token ids are used), the AnimaTextConditioner (the
"LLM adapter" that turns Qwen3 states and T5 ids into the DiT's text embeddings), the Cosmos DiT
(`CosmosTransformer3DModel`, patch (1, 2, 2)), the Qwen-Image VAE (`AutoencoderKLQwenImage`, a
video VAE: 5-D latents, 16 channels, downscale 8) and a flow-matching Euler scheduler.

The demo keeps the real model's *shape* (16 latent channels, VAE downscale 8, patch 2, so sides
must be multiples of 16; 512 padded text tokens) with tiny widths, so real resolutions run on a
CPU. Both tokenizers are built from scratch: a byte-level BPE with merges learned from common
booru words (as Qwen's), and a unigram vocabulary with T5's special tokens and sentinel ids.

`build_demo_anima_pipeline(seed)` builds it in memory; `ensure_demo_anima(cache_dir)` writes it once
into a models cache as the diffusers folder AnimaModularPipeline loads (`modular_model_index.json`
plus one subfolder per component), atomically, with a completion marker written last.

Importing this module does no work: torch, diffusers and transformers are imported inside the
functions that need them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

# The same byte <-> printable-character map and booru word list as the demo SDXL tokenizer.
from studio.fileio import folder_is_complete, write_complete_folder
from studio.models.demo import _CORPUS as BOORU_WORDS
from studio.models.demo import _bytes_to_unicode, learn_merges

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AnimaModularPipeline
    from transformers import Qwen2Tokenizer, T5TokenizerFast

DEMO_ANIMA_NAME = "demo-anima"
DEMO_ANIMA_SEED = 0
DEMO_ANIMA_FORMAT_VERSION = 2  # bump when the configs change: older caches are then rebuilt

# ---------------------------------------------------------------------------------------------
# Sizes. Real Anima: Qwen3 0.6B (hidden 1024, 28 layers), conditioner 1024 wide with 6 blocks,
# Cosmos-Predict2 2B DiT (16 heads x 128, 28 layers, text_embed_dim 1024), Qwen-Image VAE
# (base_dim 96), 512 text tokens.
# ---------------------------------------------------------------------------------------------
TEXT_HIDDEN = 32
DEMO_DIT_SIZE = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2}
TEXT_EMBED = 32  # conditioner output = the DiT's text_embed_dim
LATENT_CHANNELS = 16
MAX_SEQUENCE_LENGTH = 512
NUM_MERGES = 600
T5_EXTRA_IDS = 100  # <extra_id_0> ... <extra_id_99>, as in T5's vocabulary

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5

# Qwen2's pre-tokenizer keeps one leading non-letter (usually the space, "Ġ" byte-level) on a run
# of letters, and splits digits one by one; the learner sees words the same way.
_LETTER_RUN = re.compile(r"[a-z]+")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
def _learn_byte_level_merges(word_counts: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-level merges (no end-of-word marker), learned as demo-sdxl's tokenizer learns its own."""
    return learn_merges({word: list(word) for word in word_counts}, word_counts, num_merges)


def build_demo_qwen_tokenizer(num_merges: int = NUM_MERGES) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in Qwen2's format: 256 byte symbols, learned merges, and Qwen's
    special tokens (`<|endoftext|>` pads, as in Qwen3's own tokenizer)."""
    from transformers import Qwen2Tokenizer

    space = _bytes_to_unicode()[ord(" ")]  # "Ġ"
    runs = Counter()
    for word in BOORU_WORDS:
        for run in _LETTER_RUN.findall(word.lower()):
            runs[space + run] += 2  # mid-prompt words follow a space
            runs[run] += 1  # the prompt's first word does not
    merges = _learn_byte_level_merges(runs, num_merges)
    tokens = list(_bytes_to_unicode().values()) + ["".join(pair) for pair in merges] + list(QWEN_SPECIAL_TOKENS)
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)


def build_demo_t5_tokenizer() -> T5TokenizerFast:
    """A unigram tokenizer in T5's format: `<pad>` 0, `</s>` 1, `<unk>` 2, then whole words
    ("▁word"), single characters as the fallback, and T5's sentinel `<extra_id_N>` tokens."""
    from transformers import T5TokenizerFast

    words = sorted({run for word in BOORU_WORDS for run in _LETTER_RUN.findall(word.lower())})
    characters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.:;!?'\"()[]{}<>@#&*+-=/\\_^~|"))
    vocab = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    vocab.append(("▁", -2.0))
    vocab += [(f"▁{word}", -3.0) for word in words]  # a whole word beats spelling it out
    vocab += [(character, -6.0) for character in characters]
    return T5TokenizerFast(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=MAX_SEQUENCE_LENGTH)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _build_text_encoder(tokenizer: Qwen2Tokenizer):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention, as in Qwen3
        head_dim=16,
        max_position_embeddings=MAX_SEQUENCE_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3Model(config)


def _build_text_conditioner(t5_tokenizer: T5TokenizerFast):
    from diffusers import AnimaTextConditioner

    return AnimaTextConditioner(
        source_dim=TEXT_HIDDEN,
        target_dim=TEXT_EMBED,
        model_dim=TEXT_EMBED,
        num_layers=2,
        num_attention_heads=2,
        target_vocab_size=len(t5_tokenizer),
        min_sequence_length=MAX_SEQUENCE_LENGTH,
    )


def _build_transformer():
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        **DEMO_DIT_SIZE,
        text_embed_dim=TEXT_EMBED,
        adaln_lora_dim=8,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    )


def _build_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,  # as the real VAE: ComfyUI's (Wan) layout numbers its blocks by it
        temperal_downsample=[False, True, True],  # three downsamplings: factor 8, like the real VAE
    )


def _build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build_demo_anima_components(seed: int = DEMO_ANIMA_SEED) -> dict[str, object]:
    """The seven components by their pipeline names; the same seed gives the same weights.

    Each model is initialised under its own seed derived from `seed`, so adding or reordering
    components never changes the others' weights.
    """
    import torch

    tokenizer = build_demo_qwen_tokenizer()
    t5_tokenizer = build_demo_t5_tokenizer()
    builders = {
        "text_encoder": lambda: _build_text_encoder(tokenizer),
        "text_conditioner": lambda: _build_text_conditioner(t5_tokenizer),
        "transformer": _build_transformer,
        "vae": _build_vae,
    }
    components: dict[str, object] = {"tokenizer": tokenizer, "t5_tokenizer": t5_tokenizer}
    for offset, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + offset)
        model = build()
        model.eval()
        components[name] = model
    components["scheduler"] = _build_scheduler()
    return components


def build_demo_anima_pipeline(seed: int = DEMO_ANIMA_SEED) -> AnimaModularPipeline:
    """A tiny random-weight AnimaModularPipeline in memory (not written anywhere)."""
    from diffusers import AnimaModularPipeline

    from studio.models.anima_compat import GUIDER_LOGGER, ensure_cosmos_resize, quiet_logger

    ensure_cosmos_resize()
    with quiet_logger(GUIDER_LOGGER):  # the pipeline makes its default guider
        pipe = AnimaModularPipeline()
    pipe.update_components(**build_demo_anima_components(seed))
    return pipe


# ---------------------------------------------------------------------------------------------
# The demo model in a models cache
# ---------------------------------------------------------------------------------------------
def _index_without_locations(saved_in: Path) -> None:
    """save_pretrained records where each component was saved: the temporary folder, soon gone.
    Record no location instead: diffusers loads a component whose files lie beside the index
    from there, and a copy of the folder stays self-contained (a component missing from it is
    reported missing, not quietly read from the original)."""
    index_path = saved_in / "modular_model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for value in index.values():
        if isinstance(value, list) and len(value) == 3 and isinstance(value[2], dict):
            value[2]["pretrained_model_name_or_path"] = None
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_folder(pipe, folder: Path) -> None:
    def fill(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True, overwrite_modular_index=True)
        _index_without_locations(tmp)

    write_complete_folder(folder, fill, {"version": DEMO_ANIMA_FORMAT_VERSION, "seed": DEMO_ANIMA_SEED})


def ensure_demo_anima(cache_dir: Path) -> Path:
    """Write demo-anima into `cache_dir/demo-anima/` once and return that folder; later calls
    return it without writing. A folder without its marker (a crash midway) or from an older
    demo version is rebuilt. Load it with `AnimaModularPipeline.from_pretrained(folder)`."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / DEMO_ANIMA_NAME
    if folder_is_complete(folder, DEMO_ANIMA_FORMAT_VERSION):
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_folder(build_demo_anima_pipeline(DEMO_ANIMA_SEED), folder)
    return folder
