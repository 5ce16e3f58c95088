"""A1111 prompt semantics for SDXL: the emphasis parser, 75-token chunking, and the guarantee that
a plain prompt encodes exactly as diffusers' own `encode_prompt` does."""

import pytest

torch = pytest.importorskip("torch")

from studio.generation.conditioning import (  # noqa: E402
    BREAK,
    SDXLConditioning,
    chunk_prompt,
    count_tokens,
    encode_prompt_sdxl,
    parse_attention,
)

CPU = torch.device("cpu")
UP = 1.1
DOWN = 1 / 1.1
PROMPT = "1girl, solo, hatsune miku, vocaloid, long hair, twintails, smile, looking at viewer"
NEGATIVE = "worst quality, low quality, watermark, signature"
# Every tag here is one or two tokens of the demo tokenizer: ", ".join(TAGS) is 10 tokens.
TAGS = ["long hair", "blue eyes", "smile", "school uniform"]


@pytest.fixture(scope="module")
def pipe():
    from studio.models.demo import build_demo_sdxl_pipeline

    return build_demo_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def pipe_no_zeros(pipe):
    """The same model, configured to encode an empty negative instead of zeroing it."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**pipe.components, force_zeros_for_empty_prompt=False)


def diffusers_encode(pipe, prompt, negative):
    """diffusers' own encoding, in SDXLConditioning's field order."""
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompt,
        device=CPU,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
    )
    return SDXLConditioning(embeds, pooled, neg_embeds, neg_pooled)


def assert_same(ours: SDXLConditioning, ref: SDXLConditioning, atol=1e-6):
    for name, a in ours.pipeline_kwargs().items():
        b = ref.pipeline_kwargs()[name]
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=atol, rtol=0), f"{name}: max diff {(a - b).abs().max()}"


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------
# parse_attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [("", 1.0)]),
        ("1girl, smile", [("1girl, smile", 1.0)]),
        ("(smile)", [("smile", UP)]),
        ("((smile))", [("smile", UP * UP)]),
        ("[smile]", [("smile", DOWN)]),
        ("[[smile]]", [("smile", DOWN * DOWN)]),
        ("(smile:1.5)", [("smile", 1.5)]),
        ("( smile : 0.5 )", [(" smile ", 0.5)]),
        ("(smile:.5)", [("smile", 0.5)]),
        ("((smile:1.5))", [("smile", 1.5 * UP)]),
        ("(a (b:2))", [("a ", UP), ("b", 2 * UP)]),
        ("a (b) c", [("a ", 1.0), ("b", UP), (" c", 1.0)]),
        ("[a (b] c)", [("a ", DOWN), ("b", DOWN * UP), (" c", UP)]),  # separate stacks, as A1111
        # escapes are literal characters, weighted by the brackets around them
        (r"hatsune miku \(cosplay\)", [("hatsune miku (cosplay)", 1.0)]),
        (r"(hatsune miku \(cosplay\):1.2)", [("hatsune miku (cosplay)", 1.2)]),
        (r"\[a\] \\ b", [("[a] \\ b", 1.0)]),
        (r"a\b", [("ab", 1.0)]),  # a backslash escaping nothing is dropped
        # unbalanced: an open bracket reaches the end, a stray closer is text
        ("a (b, c", [("a ", 1.0), ("b, c", UP)]),
        ("a [b", [("a ", 1.0), ("b", DOWN)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("x:1.2) y", [("x:1.2) y", 1.0)]),
        ("(a:b)", [("a:b", UP)]),
        # BREAK: uppercase, its own word, eats the spaces around it
        ("a, BREAK b", [("a,", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", UP), BREAK, ("b", UP)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
        ("a break b, BREAKfast", [("a break b, BREAKfast", 1.0)]),
        # adjacent runs of equal weight merge, even across brackets
        ("(a)(b)", [("ab", UP)]),
        ("(a:1.2), (b:1.2)", [("a", 1.2), (", ", 1.0), ("b", 1.2)]),
        ("(a:1.0) b", [("a b", 1.0)]),
    ],
)
def test_parse_attention(text, expected):
    result = parse_attention(text)
    assert [t for t, _ in result] == [t for t, _ in expected]
    assert [w for _, w in result] == pytest.approx([w for _, w in expected])


# ---------------------------------------------------------------------------------------------
# Chunking and token counting
# ---------------------------------------------------------------------------------------------
def test_short_prompt_ids_match_the_tokenizer(pipe):
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):  # the second pads with "!"
        chunks = chunk_prompt(tokenizer, PROMPT)
        expected = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        assert chunks.ids == [expected]
        assert chunks.weights == [[1.0] * 77]


def test_exactly_75_tokens_is_one_chunk_and_76_is_two(pipe):
    tokenizer = pipe.tokenizer
    assert len(ids_of(tokenizer, "smile " * 75)) == 75
    assert len(chunk_prompt(tokenizer, "smile " * 75).ids) == 1
    assert len(chunk_prompt(tokenizer, "smile " * 76).ids) == 2
    assert count_tokens(tokenizer, "smile " * 75) == (75, 75)
    assert count_tokens(tokenizer, "smile " * 76) == (76, 150)


def test_long_prompt_breaks_after_a_recent_comma(pipe):
    tokenizer = pipe.tokenizer
    prompt = ", ".join(TAGS * 10)
    tokens = ids_of(tokenizer, prompt)
    comma = ids_of(tokenizer, ",")[0]
    chunks = chunk_prompt(tokenizer, prompt)
    assert len(chunks.ids) == 2
    first = chunks.ids[0][1 : chunks.ids[0].index(tokenizer.eos_token_id)]
    # the first chunk stops after a comma, fewer than 20 tokens before the 75-token boundary...
    assert first[-1] == comma and 55 <= len(first) < 75
    assert first == tokens[: len(first)]
    # ...and the second chunk carries on from there, with nothing lost
    second = chunks.ids[1][1 : chunks.ids[1].index(tokenizer.eos_token_id)]
    assert first + second == tokens


@pytest.mark.parametrize("comma_at, first_length", [(54, 75), (55, 56), (74, 75)])
def test_comma_backtrack_reaches_20_tokens(pipe, comma_at, first_length):
    """A comma at index 55 of the chunk is 20 tokens before the boundary: the chunk ends after it.
    One at 54 is too far back, and one at 74 is the last token anyway: the chunk is cut at 75."""
    tokenizer = pipe.tokenizer
    prompt = "smile " * comma_at + ", " + "smile " * 40
    tokens = ids_of(tokenizer, prompt)
    assert tokens.index(ids_of(tokenizer, ",")[0]) == comma_at
    chunks = chunk_prompt(tokenizer, prompt)
    assert chunks.ids[0][1 : 1 + first_length] == tokens[:first_length]
    assert chunks.ids[0][1 + first_length] == tokenizer.eos_token_id
    rest = len(tokens) - first_length
    assert chunks.ids[1][1 : 1 + rest] == tokens[first_length:]
    assert chunks.ids[1][1 + rest] == tokenizer.eos_token_id


def test_break_forces_a_new_chunk(pipe):
    tokenizer = pipe.tokenizer
    chunks = chunk_prompt(tokenizer, "1girl, smile BREAK blue sky")
    pad = lambda text: tokenizer(text, padding="max_length", max_length=77).input_ids  # noqa: E731
    assert chunks.ids == [pad("1girl, smile"), pad("blue sky")]


def test_weights_follow_their_tokens(pipe):
    tokenizer = pipe.tokenizer
    chunks = chunk_prompt(tokenizer, "1girl, (smile:1.5), [blue sky]")
    n_girl = len(ids_of(tokenizer, "1girl, "))
    n_smile = len(ids_of(tokenizer, "smile"))
    weights = chunks.weights[0]
    assert weights[0] == 1.0  # bos
    assert weights[1 : 1 + n_girl] == [1.0] * n_girl
    assert weights[1 + n_girl : 1 + n_girl + n_smile] == [1.5] * n_smile
    assert weights[-1] == 1.0  # padding
    assert DOWN in weights


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("", (0, 75)),
        ("1girl, smile", (4, 75)),  # 1 / girl / , / smile
        ("(1girl:1.3), [smile]", (4, 75)),  # brackets and weights are not tokens
        ("1girl BREAK smile", (76, 150)),  # a chunk closed by BREAK counts as full, as in A1111
    ],
)
def test_count_tokens(pipe, prompt, expected):
    assert count_tokens(pipe, prompt) == expected
    assert count_tokens(pipe.tokenizer_2, prompt) == expected


def test_count_tokens_of_a_long_prompt(pipe):
    prompt = ", ".join(TAGS * 10)
    tokens = ids_of(pipe.tokenizer, prompt)
    first_chunk = max(i for i, t in enumerate(tokens[:75]) if t == ids_of(pipe.tokenizer, ",")[0]) + 1
    assert len(tokens) == 109 and first_chunk == 74
    # A1111 counts the chunk ended early at the comma as 75 tokens
    assert count_tokens(pipe, prompt) == (75 + len(tokens) - first_chunk, 150)
    assert count_tokens(pipe, ", ".join(TAGS * 20))[1] == 225


def test_unconfigured_tokenizer_is_refused(pipe):
    import copy

    tokenizer = copy.deepcopy(pipe.tokenizer)
    tokenizer.model_max_length = int(1e30)
    with pytest.raises(ValueError, match="model_max_length=77"):
        chunk_prompt(tokenizer, "1girl")


# ---------------------------------------------------------------------------------------------
# Encoding: equal to diffusers in the common case
# ---------------------------------------------------------------------------------------------
def test_plain_prompt_equals_diffusers(pipe):
    assert_same(encode_prompt_sdxl(pipe, PROMPT, NEGATIVE, CPU), diffusers_encode(pipe, PROMPT, NEGATIVE))


def test_empty_negative_is_zeros_like_diffusers(pipe):
    ours = encode_prompt_sdxl(pipe, PROMPT, "", CPU)
    # diffusers zeroes only a missing (None) negative; the studio's empty text box means the same
    assert_same(ours, diffusers_encode(pipe, PROMPT, None))
    assert not ours.negative_prompt_embeds.any() and not ours.negative_pooled_prompt_embeds.any()
    assert ours.prompt_embeds.any()


def test_empty_negative_is_encoded_without_force_zeros(pipe_no_zeros):
    ours = encode_prompt_sdxl(pipe_no_zeros, PROMPT, "", CPU)
    assert_same(ours, diffusers_encode(pipe_no_zeros, PROMPT, ""))
    assert_same(ours, diffusers_encode(pipe_no_zeros, PROMPT, None))
    assert ours.negative_prompt_embeds.abs().sum() > 0


def test_escaped_parentheses_encode_as_plain_parentheses(pipe):
    ours = encode_prompt_sdxl(pipe, r"1girl, hatsune miku \(cosplay\)", NEGATIVE, CPU)
    assert_same(ours, diffusers_encode(pipe, "1girl, hatsune miku (cosplay)", NEGATIVE))


def test_dtype_is_applied(pipe):
    cond = encode_prompt_sdxl(pipe, PROMPT, NEGATIVE, CPU, dtype=torch.float16)
    assert {t.dtype for t in cond.pipeline_kwargs().values()} == {torch.float16}


def test_long_prompt_is_encoded_whole(pipe):
    head = ", ".join(TAGS * 6) + ", cat ears, animal ears, red eyes,"  # 75 tokens
    prompt, other_tail = head + " night", head + " day"
    assert count_tokens(pipe, head) == (75, 75)
    assert count_tokens(pipe, prompt) == (76, 150)
    a = encode_prompt_sdxl(pipe, prompt, NEGATIVE, CPU)
    b = encode_prompt_sdxl(pipe, other_tail, NEGATIVE, CPU)
    assert a.prompt_embeds.shape == (1, 154, 96)
    assert a.negative_prompt_embeds.shape == (1, 154, 96)  # padded with an empty chunk for CFG
    assert torch.equal(a.prompt_embeds[:, :77], b.prompt_embeds[:, :77])
    assert not torch.allclose(a.prompt_embeds[:, 77:], b.prompt_embeds[:, 77:])
    assert torch.equal(a.pooled_prompt_embeds, b.pooled_prompt_embeds)  # pooled: first chunk only
    three = encode_prompt_sdxl(pipe, ", ".join(TAGS * 20), NEGATIVE, CPU)
    assert three.prompt_embeds.shape[1] == 231


def test_break_encodes_each_part_as_its_own_chunk(pipe):
    ours = encode_prompt_sdxl(pipe, "1girl, smile BREAK blue sky, night", NEGATIVE, CPU)
    first = diffusers_encode(pipe, "1girl, smile", NEGATIVE)
    second = diffusers_encode(pipe, "blue sky, night", NEGATIVE)
    assert ours.prompt_embeds.shape == (1, 154, 96)
    assert torch.allclose(ours.prompt_embeds[:, :77], first.prompt_embeds, atol=1e-6)
    assert torch.allclose(ours.prompt_embeds[:, 77:], second.prompt_embeds, atol=1e-6)
    assert torch.allclose(ours.pooled_prompt_embeds, first.pooled_prompt_embeds, atol=1e-6)


def test_shorter_prompt_is_padded_with_empty_chunks(pipe):
    ours = encode_prompt_sdxl(pipe, "1girl", ", ".join(TAGS * 10), CPU)
    empty = diffusers_encode(pipe, "", None)
    assert ours.prompt_embeds.shape == ours.negative_prompt_embeds.shape == (1, 154, 96)
    assert torch.allclose(ours.prompt_embeds[:, :77], diffusers_encode(pipe, "1girl", None).prompt_embeds)
    assert torch.allclose(ours.prompt_embeds[:, 77:], empty.prompt_embeds, atol=1e-6)


def test_weight_changes_embeddings_and_weight_one_does_not(pipe):
    plain = encode_prompt_sdxl(pipe, "1girl, smile", NEGATIVE, CPU)
    one = encode_prompt_sdxl(pipe, "1girl, (smile:1.0)", NEGATIVE, CPU)
    heavy = encode_prompt_sdxl(pipe, "1girl, (smile:1.5)", NEGATIVE, CPU)
    for name, tensor in plain.pipeline_kwargs().items():
        assert torch.equal(one.pipeline_kwargs()[name], tensor), name
    assert not torch.allclose(heavy.prompt_embeds, plain.prompt_embeds)
    assert torch.equal(heavy.pooled_prompt_embeds, plain.pooled_prompt_embeds)  # weights skip pooled
    assert torch.equal(heavy.negative_prompt_embeds, plain.negative_prompt_embeds)


def test_emphasis_scales_tokens_and_keeps_each_encoders_mean(pipe):
    """A1111's original emphasis: z * w, then rescaled to the unweighted mean, per encoder."""
    plain = encode_prompt_sdxl(pipe, "1girl, smile", "", CPU).prompt_embeds[0].double()
    heavy = encode_prompt_sdxl(pipe, "1girl, (smile:1.5)", "", CPU).prompt_embeds[0].double()
    smile = 1 + len(ids_of(pipe.tokenizer, "1girl, "))  # position of the weighted token
    for features in (slice(0, 32), slice(32, 96)):  # encoder 1 (32 wide), encoder 2 (64 wide)
        p, h = plain[:, features], heavy[:, features]
        assert torch.isclose(h.mean(), p.mean(), rtol=1e-5)
        ratio = h / p  # one constant c on unweighted tokens, 1.5 c on the weighted one
        c = ratio[0].mean()
        assert not torch.isclose(c, torch.tensor(1.0, dtype=c.dtype), atol=1e-3)
        others = torch.cat([ratio[:smile], ratio[smile + 1 :]])
        assert torch.allclose(others, c.expand_as(others), rtol=1e-4)
        assert torch.allclose(ratio[smile], (1.5 * c).expand_as(ratio[smile]), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# A full generation
# ---------------------------------------------------------------------------------------------
def generate(pipe, **kwargs):
    generator = torch.Generator("cpu").manual_seed(7)
    result = pipe(height=64, width=64, num_inference_steps=2, generator=generator, output_type="np", **kwargs)
    return result.images


@pytest.mark.parametrize("negative, diffusers_negative", [(NEGATIVE, NEGATIVE), ("", None)])
def test_generation_matches_plain_diffusers(pipe, negative, diffusers_negative):
    cond = encode_prompt_sdxl(pipe, PROMPT, negative, CPU)
    ours = generate(pipe, **cond.pipeline_kwargs())
    reference = generate(pipe, prompt=PROMPT, negative_prompt=diffusers_negative)
    assert ours.shape == (1, 64, 64, 3)
    assert abs(ours - reference).max() < 1e-5
    other = generate(pipe, **encode_prompt_sdxl(pipe, "1boy, short hair", negative, CPU).pipeline_kwargs())
    assert abs(other - reference).max() > 1e-3  # the comparison can tell prompts apart


def test_repeat_matches_num_images_per_prompt(pipe):
    cond = encode_prompt_sdxl(pipe, PROMPT, NEGATIVE, CPU).repeat(2)
    assert cond.prompt_embeds.shape[0] == cond.negative_pooled_prompt_embeds.shape[0] == 2
    ours = generate(pipe, **cond.pipeline_kwargs())
    reference = generate(pipe, prompt=PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2)
    assert abs(ours - reference).max() < 1e-5
