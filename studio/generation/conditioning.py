"""Prompt conditioning for SDXL with A1111/Forge prompt semantics.

Users paste prompts from A1111 and Forge, so emphasis must mean what it means there:

- `(tag)` multiplies the weight by 1.1, `[tag]` divides it by 1.1, `(tag:1.3)` multiplies it by
  1.3; nesting multiplies (`((tag))` is 1.21, `(a (b:2))` gives b 2.2).
- `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters, so booru tags such as
  `hatsune miku \\(cosplay\\)` keep their parentheses as text. A backslash before any other
  character is dropped, as in A1111.
- An unclosed `(` or `[` applies to the end of the prompt; a stray `)` or `]` is literal text.
- `BREAK` (uppercase, a word of its own) ends the current 75-token chunk.
- Prompts longer than 75 tokens are split into 75-token chunks, each encoded on its own and
  concatenated (a chunk boundary moves back to a comma in the last 20 tokens), as in A1111.
- Weights scale each token's hidden state, then the chunk is rescaled so its mean is unchanged
  (A1111's "Original" emphasis). Weights never touch the pooled embedding.

We considered compel, the usual library for weighted prompts in diffusers, and did not use it:
its syntax is `(tag)1.2` / `tag++`, not A1111's `(tag:1.2)`, and it weights differently (it
blends with an embedding of the prompt with the tag masked out rather than scaling the hidden
states), so a pasted A1111 prompt would give a different picture. Prompt editing
(`[a:b:0.5]`) and alternation (`[a|b]`) are A1111 sampler features, not emphasis, and are not
supported: their characters are read with the rules above.

Guarantee: for a prompt without emphasis syntax that fits in 75 tokens, `encode_prompt_sdxl`
returns exactly what diffusers' own `StableDiffusionXLPipeline.encode_prompt` returns (an empty
negative prompt counts as diffusers' "no negative prompt").

Importing this module does no work; torch is imported by the functions that encode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

ROUND_BRACKET_FACTOR = 1.1  # `(x)`; `[x]` divides by it
COMMA_BACKTRACK = 20  # A1111's default: a chunk may end at a comma up to 20 tokens early
BREAK = ("BREAK", -1.0)  # how parse_attention marks a chunk break (A1111's own convention)

# One lexical unit of the emphasis syntax per match, tried in this order.
_ATTENTION_RE = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])                                  # \( \) \[ \] \\ : the character
    | :\s*(?P<factor>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)            # ":1.3)" closes a ( with a factor
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<backslash>\\)                                          # escapes nothing: dropped
    | (?P<text>[^\\()\[\]:]+|:)                                  # plain text; a lone ":" is text
    """,
    re.VERBOSE,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


# ---------------------------------------------------------------------------------------------
# 1. Emphasis syntax -> weighted text fragments
# ---------------------------------------------------------------------------------------------
def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs; `BREAK` markers come out as `BREAK`.

    >>> parse_attention("a (b:1.5) [c] \\\\(d\\\\)")
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 0.9090909090909091), (' (d)', 1.0)]
    """
    fragments: list[list] = []  # [text, weight]; a BREAK marker is the list ["BREAK", None]
    open_round: list[int] = []  # fragment index where each unclosed "(" starts
    open_square: list[int] = []  # A1111 keeps the two kinds on separate stacks

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] is not None:
                fragment[1] *= factor

    for match in _ATTENTION_RE.finditer(text):
        if match["escaped"] is not None:
            fragments.append([match["escaped"], 1.0])
        elif match["factor"] is not None and open_round:
            scale_from(open_round.pop(), float(match["factor"]))
        elif match["open"] == "(":
            open_round.append(len(fragments))
        elif match["open"] == "[":
            open_square.append(len(fragments))
        elif match["close"] == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif match["close"] == "]" and open_square:
            scale_from(open_square.pop(), 1 / ROUND_BRACKET_FACTOR)
        elif match["backslash"] is None:  # plain text, a stray closer, or ":1.3)" with no "("
            for i, part in enumerate(_BREAK_RE.split(match[0])):
                if i > 0:
                    fragments.append([BREAK[0], None])
                fragments.append([part, 1.0])

    for start in open_round:  # unclosed brackets reach to the end of the prompt
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        scale_from(start, 1 / ROUND_BRACKET_FACTOR)
    return _merge_runs(fragments)


def _merge_runs(fragments: list[list]) -> list[tuple[str, float]]:
    """Drop empty text, join neighbours of equal weight, turn markers into `BREAK`."""
    runs: list[tuple[str, float]] = []
    for text, weight in fragments:
        if weight is None:
            runs.append(BREAK)
        elif text and runs and runs[-1] != BREAK and runs[-1][1] == weight:
            runs[-1] = (runs[-1][0] + text, weight)
        elif text:
            runs.append((text, weight))
    return runs or [("", 1.0)]


# ---------------------------------------------------------------------------------------------
# 2. Weighted fragments -> 75-token chunks of token ids
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptChunks:
    """A prompt as the text encoder sees it: chunks of [bos] + 75 tokens + [eos], padded."""

    ids: list[list[int]]  # each exactly tokenizer.model_max_length long (77 for CLIP)
    weights: list[list[float]]  # one per id; 1.0 on bos, eos and padding
    token_count: int  # A1111's count: a chunk closed early (BREAK, comma) counts as full

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for chunk in self.weights for w in chunk)


def chunk_prompt(tokenizer, prompt: str) -> PromptChunks:
    """Tokenize an A1111 prompt for one CLIP tokenizer, A1111's way.

    A prompt of at most 75 tokens without emphasis gives the same ids as
    `tokenizer(prompt, padding="max_length", truncation=True)`.
    """
    return _chunk_runs(tokenizer, parse_attention(prompt))


def _chunk_runs(tokenizer, runs: list[tuple[str, float]]) -> PromptChunks:
    chunk_length = _chunk_length(tokenizer)
    texts = [text for text, _ in runs]
    token_ids = tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
    comma = tokenizer(",", add_special_tokens=False, verbose=False).input_ids
    comma_id = comma[0] if len(comma) == 1 else None

    pieces = [None if run == BREAK else (ids, run[1]) for run, ids in zip(runs, token_ids)]
    chunks, token_count = _split_chunks(pieces, chunk_length, comma_id)

    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_ids, all_weights = [], []
    for tokens, weights in chunks:
        padding = chunk_length - len(tokens)
        all_ids.append([bos, *tokens, eos] + [pad] * padding)
        all_weights.append([1.0, *weights, 1.0] + [1.0] * padding)
    return PromptChunks(all_ids, all_weights, token_count)


def caption_chunk_ids(tokenizer, caption: str, chunks: int) -> list[list[int]]:
    """A training caption as exactly `chunks` windows of [bos] + 75 tokens + [eos], split as
    generation splits a prompt (at a recent comma), without reading emphasis or BREAK (a caption
    is plain text); longer captions are cut after the last window, shorter ones padded with empty
    windows, so every caption of a run has the same length (kohya's max_token_length)."""
    ids = _chunk_runs(tokenizer, [(caption, 1.0)]).ids[:chunks]
    empty = _chunk_runs(tokenizer, [("", 1.0)]).ids
    return ids + empty * (chunks - len(ids))


def _chunk_length(tokenizer) -> int:
    max_length = tokenizer.model_max_length
    if not 3 <= max_length <= 1024:
        raise ValueError(
            f"Tokenizer model_max_length is {max_length}; a CLIP tokenizer must be loaded with "
            "model_max_length=77 (transformers' default of 1e30 breaks chunking and padding)."
        )
    return max_length - 2


def _split_chunks(
    pieces: list[tuple[list[int], float] | None], chunk_length: int, comma_id: int | None
) -> tuple[list[tuple[list[int], list[float]]], int]:
    """Fill chunks token by token; `None` in `pieces` is a BREAK. Returns (chunks, token count)."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index of the last comma in the current chunk
    token_count = 0

    for piece in pieces:
        if piece is None:
            chunks.append((tokens, weights))
            token_count += chunk_length
            tokens, weights, last_comma = [], [], -1
            continue
        ids, weight = piece
        for token in ids:
            if len(tokens) == chunk_length:
                # The chunk is full: end it after a recent comma rather than mid-tag.
                cut = chunk_length
                if token != comma_id and last_comma >= 0 and chunk_length - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                chunks.append((tokens[:cut], weights[:cut]))
                token_count += chunk_length
                tokens, weights, last_comma = tokens[cut:], weights[cut:], -1
            if token == comma_id:
                last_comma = len(tokens)
            tokens.append(token)
            weights.append(weight)

    if tokens or not chunks:
        chunks.append((tokens, weights))
        token_count += len(tokens)
    return chunks, token_count


def count_tokens(pipe_or_tokenizer, prompt: str) -> tuple[int, int]:
    """(tokens used, chunk capacity) for the UI's counter, e.g. (83, 150), as A1111 shows it."""
    tokenizer = pipe_or_tokenizer
    if hasattr(pipe_or_tokenizer, "components"):  # a pipeline: count with its first tokenizer
        tokenizer = pipe_or_tokenizer.tokenizer or pipe_or_tokenizer.tokenizer_2
    chunks = chunk_prompt(tokenizer, prompt)
    return chunks.token_count, len(chunks.ids) * _chunk_length(tokenizer)


# ---------------------------------------------------------------------------------------------
# 3. Chunks -> SDXL conditioning tensors
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SDXLConditioning:
    """What the SDXL UNet is conditioned on, for one image (batch 1)."""

    prompt_embeds: torch.Tensor  # [1, 77 * chunks, hidden_1 + hidden_2]
    pooled_prompt_embeds: torch.Tensor  # [1, projection_dim]
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor

    def repeat(self, batch_size: int) -> SDXLConditioning:
        """The same conditioning for `batch_size` images."""
        return replace(
            self,
            prompt_embeds=self.prompt_embeds.repeat(batch_size, 1, 1),
            pooled_prompt_embeds=self.pooled_prompt_embeds.repeat(batch_size, 1),
            negative_prompt_embeds=self.negative_prompt_embeds.repeat(batch_size, 1, 1),
            negative_pooled_prompt_embeds=self.negative_pooled_prompt_embeds.repeat(batch_size, 1),
        )

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for `StableDiffusionXLPipeline.__call__`."""
        return {
            "prompt_embeds": self.prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds,
        }


def encode_prompt_sdxl(pipe, prompt: str, negative: str, device, dtype=None) -> SDXLConditioning:
    """Encode a positive and a negative A1111 prompt for an SDXL pipeline.

    Each encoder runs once, on every chunk of both prompts together. Hidden states are the
    penultimate layer's, as in diffusers; the pooled embedding is the second encoder's projection
    of the first chunk. The negative is padded with empty chunks (or the positive is) so that
    both have the same length for classifier-free guidance. An empty (or blank) negative gives
    zeros when the model's `force_zeros_for_empty_prompt` is set, like diffusers and A1111.
    The text encoders must already be on `device`.
    """
    import torch

    # 1. The pipeline's (tokenizer, text encoder) pairs; the SDXL refiner has only the second.
    pairs = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    encoders = [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]
    if not encoders:
        raise ValueError("This pipeline has no text encoder loaded; prompts cannot be encoded.")
    dtype = dtype or encoders[-1][1].dtype

    # 2. Parse once, tokenize for each tokenizer, give every prompt the same number of chunks.
    zero_negative = not (negative or "").strip() and bool(pipe.config.force_zeros_for_empty_prompt)
    runs = [parse_attention(prompt)] + ([] if zero_negative else [parse_attention(negative or "")])
    chunked = [[_chunk_runs(tokenizer, r) for r in runs] for tokenizer, _ in encoders]
    num_chunks = max(len(chunks.ids) for per_encoder in chunked for chunks in per_encoder)

    # 3. Encode all chunks of both prompts in one call per encoder; apply the emphasis.
    embeds, pooled = [], None
    with torch.no_grad():
        for (tokenizer, encoder), per_prompt in zip(encoders, chunked):
            empty = _chunk_runs(tokenizer, [("", 1.0)])
            ids, weights = [], []
            for chunks in per_prompt:
                missing = num_chunks - len(chunks.ids)
                ids += chunks.ids + empty.ids * missing
                weights += chunks.weights + empty.weights * missing
            output = encoder(torch.tensor(ids, device=device), output_hidden_states=True)
            hidden = _apply_emphasis(output.hidden_states[-2], torch.tensor(weights, device=device))
            embeds.append(hidden.reshape(len(per_prompt), -1, hidden.shape[-1]))
            pooled = getattr(output, "text_embeds", None)
    if pooled is None:
        raise ValueError("SDXL's last text encoder must have a projection (CLIPTextModelWithProjection).")

    # 4. Join the encoders on the feature axis; pooled = first chunk of each prompt.
    embeds = torch.cat(embeds, dim=-1).to(device=device, dtype=dtype)
    pooled = pooled[::num_chunks].to(device=device, dtype=dtype)
    if zero_negative:
        embeds = torch.cat([embeds, torch.zeros_like(embeds)])
        pooled = torch.cat([pooled, torch.zeros_like(pooled)])
    return SDXLConditioning(
        prompt_embeds=embeds[:1],
        pooled_prompt_embeds=pooled[:1],
        negative_prompt_embeds=embeds[1:],
        negative_pooled_prompt_embeds=pooled[1:],
    )


def _apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token by its weight, then restore each chunk's mean (A1111 "Original").

    `hidden` is [chunks, tokens, features], `weights` [chunks, tokens]. Chunks without weights
    are returned bit for bit unchanged.
    """
    import torch

    weighted = (weights != 1.0).any(dim=1)
    if not weighted.any():
        return hidden
    z = hidden.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[:, :, None].to(z.dtype)
    z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted[:, None, None], z.to(hidden.dtype), hidden)
