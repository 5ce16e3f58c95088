"""The Animagine XL 3.1 prompt builder: tag splitting, ordering, de-duplication, idempotence."""

import itertools

import pytest

from studio.generation.prompt import (
    ANIMAGINE_NEGATIVE,
    ANIMAGINE_QUALITY_TAGS,
    build_prompt,
    split_tags,
    tag_keys,
)
from studio.schemas import AESTHETIC_TAGS, RATING_TAGS, YEAR_TAGS, PromptStyle

PLAIN = PromptStyle(quality_tags=False, default_negative=False)
QUALITY = ", ".join(ANIMAGINE_QUALITY_TAGS)


def positive(prompt: str, **style) -> str:
    return build_prompt(prompt, "", PromptStyle(default_negative=False, **style))[0]


def negative(neg: str, prompt: str = "1girl", **style) -> str:
    return build_prompt(prompt, neg, PromptStyle(quality_tags=False, **style))[1]


# --- constants -------------------------------------------------------------------------------


def test_constants_are_animagines_own():
    assert ANIMAGINE_QUALITY_TAGS == ("masterpiece", "best quality", "very aesthetic", "absurdres")
    assert ANIMAGINE_NEGATIVE == (
        "nsfw, lowres, (bad), text, error, fewer, extra, missing, worst quality, jpeg artifacts, "
        "low quality, watermark, unfinished, displeasing, oldest, early, chromatic aberration, "
        "signature, extra digits, artistic error, username, scan, [abstract]"
    )


# --- split_tags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("   ", []),
        (",, ,\n,", []),
        ("1girl, solo", ["1girl", "solo"]),
        ("  1girl ,solo  ,  smile ", ["1girl", "solo", "smile"]),
        ("1girl,,solo,", ["1girl", "solo"]),
        ("1girl\nsolo\n\nsmile", ["1girl", "solo", "smile"]),
        ("1girl,\r\nsolo", ["1girl", "solo"]),
        ("1girl, (red hair, blue eyes:1.2), smile", ["1girl", "(red hair, blue eyes:1.2)", "smile"]),
        ("((masterpiece, best quality)), solo", ["((masterpiece, best quality))", "solo"]),
        ("[abstract, sketch], solo", ["[abstract, sketch]", "solo"]),
        ("{a, b}, c", ["{a, b}", "c"]),
        ("(a, [b, c], d:1.1), e", ["(a, [b, c], d:1.1)", "e"]),
        (r"hatsune miku \(cosplay\), 1girl", [r"hatsune miku \(cosplay\)", "1girl"]),
        (r"a\,b, c", [r"a\,b", "c"]),
        (r"\(a, b\)", [r"\(a", r"b\)"]),  # escaped parentheses do not group
        (r"(a \) b, c:1.2), d", [r"(a \) b, c:1.2)", "d"]),  # an escaped ) does not close
        (r"a\\, b", [r"a\\", "b"]),  # an escaped backslash does not escape the comma
        ("<lora:asuka_v2:0.8>, 1girl", ["<lora:asuka_v2:0.8>", "1girl"]),
        ("1girl BREAK solo, smile", ["1girl BREAK solo", "smile"]),
        # unpaired brackets (kaomoji, typos) are text and do not swallow the rest
        (":(, solo, smile", [":(", "solo", "smile"]),
        (":), >_<, ^_^, solo", [":)", ">_<", "^_^", "solo"]),
        ("(a, b], c", ["(a", "b]", "c"]),
        ("日本語, 初音ミク, 🎉", ["日本語", "初音ミク", "🎉"]),
    ],
)
def test_split_tags(text, expected):
    assert split_tags(text) == expected


@pytest.mark.parametrize(
    "tag, keys",
    [
        ("masterpiece", {"masterpiece"}),
        ("MasterPiece", {"masterpiece"}),
        ("(masterpiece:1.2)", {"masterpiece"}),
        ("(masterpiece: 1.2 )", {"masterpiece"}),
        ("((masterpiece))", {"masterpiece"}),
        ("[masterpiece]", {"masterpiece"}),
        ("{masterpiece}", {"masterpiece"}),
        ("best_quality", {"best quality"}),
        ("best   quality", {"best quality"}),
        ("(red hair, blue eyes:1.2)", {"red hair", "blue eyes"}),
        (r"hatsune miku \(cosplay\)", {r"hatsune miku \(cosplay\)"}),
        (r"(hatsune miku \(cosplay\):1.1)", {r"hatsune miku \(cosplay\)"}),
        ("hatsune miku (cosplay)", {"hatsune miku cosplay"}),
        ("(bad)", {"bad"}),
        ("[abstract]", {"abstract"}),
        ("()", set()),
    ],
)
def test_tag_keys(tag, keys):
    assert tag_keys(tag) == keys


# --- build_prompt: positive ------------------------------------------------------------------


def test_default_style_appends_quality_tags_after_user_tags():
    assert positive("1girl, solo") == f"1girl, solo, {QUALITY}"


def test_plain_style_leaves_prompts_alone():
    assert build_prompt("1girl, solo", "lowres", PLAIN) == ("1girl, solo", "lowres")


def test_special_tags_order_rating_year_aesthetic_quality():
    built = positive("1girl, souryuu asuka langley", rating="safe", year="newest", aesthetic="very aesthetic")
    assert built == (
        "1girl, souryuu asuka langley, safe, newest, very aesthetic, masterpiece, best quality, absurdres"
    )


def test_each_special_tag_only_when_chosen():
    assert positive("1girl", quality_tags=False) == "1girl"
    assert positive("1girl", quality_tags=False, year="mid") == "1girl, mid"
    assert positive("1girl", quality_tags=False, rating="sensitive") == "1girl, sensitive"
    assert positive("1girl", quality_tags=False, aesthetic="displeasing") == "1girl, displeasing"


@pytest.mark.parametrize("aesthetic", ["aesthetic", "displeasing", "very displeasing"])
def test_lower_aesthetic_drops_very_aesthetic_from_quality(aesthetic):
    built = positive("1girl", aesthetic=aesthetic)
    assert split_tags(built) == ["1girl", aesthetic, "masterpiece", "best quality", "absurdres"]


def test_very_aesthetic_chosen_appears_once_in_its_slot():
    assert positive("1girl", aesthetic="very aesthetic", year="recent") == (
        "1girl, recent, very aesthetic, masterpiece, best quality, absurdres"
    )


def test_lower_aesthetic_in_users_prompt_also_drops_very_aesthetic():
    assert positive("1girl, aesthetic") == "1girl, aesthetic, masterpiece, best quality, absurdres"


def test_very_aesthetic_in_users_prompt_is_not_added_again():
    assert positive("very aesthetic, 1girl") == "very aesthetic, 1girl, masterpiece, best quality, absurdres"


@pytest.mark.parametrize(
    "prompt",
    [
        "1girl, masterpiece",
        "1girl, MASTERPIECE",
        "1girl, (masterpiece:1.2)",
        "1girl, ((masterpiece))",
        "1girl, [masterpiece]",
        "(masterpiece, solo:1.1), 1girl",
    ],
)
def test_weighted_or_cased_duplicates_are_not_added(prompt):
    built = split_tags(positive(prompt))
    assert built[: len(split_tags(prompt))] == split_tags(prompt)
    assert sum("masterpiece" in tag_keys(t) for t in built) == 1


def test_quality_group_in_users_prompt_suppresses_all_its_tags():
    prompt = "(masterpiece, best quality, very aesthetic, absurdres:1.2), 1girl"
    assert positive(prompt) == prompt


def test_underscore_spelling_counts_as_present():
    assert positive("best_quality, 1girl") == "best_quality, 1girl, masterpiece, very aesthetic, absurdres"


def test_rating_already_in_prompt_is_not_added():
    assert positive("1girl, Safe", rating="safe", quality_tags=False) == "1girl, Safe"


def test_exact_duplicates_in_users_prompt_are_removed():
    assert positive("1girl, solo, 1girl, Solo, smile,  SOLO ", quality_tags=False) == "1girl, solo, smile"


def test_users_weighted_variants_are_kept_as_written():
    # different weights are different requests: never rewritten, never merged
    assert positive("masterpiece, (masterpiece:1.2)", quality_tags=False) == "masterpiece, (masterpiece:1.2)"


def test_users_tags_keep_their_spelling_order_and_weights():
    prompt = "1GIRL,(solo:1.1) ,  Looking_At_Viewer,[smile], <lora:asuka:0.7>, (blue eyes:0.9)"
    assert positive(prompt, quality_tags=False) == (
        "1GIRL, (solo:1.1), Looking_At_Viewer, [smile], <lora:asuka:0.7>, (blue eyes:0.9)"
    )


def test_escaped_parentheses_names_are_preserved():
    prompt = r"1girl, hatsune miku \(cosplay\), kafuu chino, gochuumon wa usagi desu ka\?"
    assert positive(prompt, quality_tags=False) == prompt


def test_escaped_name_duplicates_are_removed_but_weighted_word_is_different():
    prompt = r"hatsune miku \(cosplay\), Hatsune Miku \(Cosplay\), hatsune miku (cosplay)"
    assert positive(prompt, quality_tags=False) == r"hatsune miku \(cosplay\), hatsune miku (cosplay)"


def test_break_keyword_is_never_merged():
    assert positive("1girl, BREAK, solo, BREAK, smile", quality_tags=False) == (
        "1girl, BREAK, solo, BREAK, smile"
    )


def test_messy_separators_are_cleaned():
    assert positive(",,1girl,, ,\nsolo,\n", quality_tags=False) == "1girl, solo"


def test_empty_prompt_gives_only_style_tags():
    assert positive("", rating="safe") == f"safe, {QUALITY}"
    assert build_prompt("", "", PLAIN) == ("", "")


def test_multiline_prompt_is_joined_with_commas():
    assert positive("1girl\nsolo\nsmile", quality_tags=False) == "1girl, solo, smile"


# --- build_prompt: negative ------------------------------------------------------------------


def test_official_negative_added_when_user_negative_empty():
    assert negative("") == ANIMAGINE_NEGATIVE


def test_no_default_negative_keeps_users_negative_only():
    assert negative("lowres, lowres, bad hands", default_negative=False) == "lowres, bad hands"


def test_users_negative_first_then_missing_official_tags():
    built = split_tags(negative("bad hands, (worst quality:1.4), Lowres, bad, abstract"))
    assert built[:5] == ["bad hands", "(worst quality:1.4)", "Lowres", "bad", "abstract"]
    official = split_tags(ANIMAGINE_NEGATIVE)
    for present in ("worst quality", "lowres", "(bad)", "[abstract]"):
        assert present not in built[5:]
    assert built[5:] == [t for t in official if t not in ("worst quality", "lowres", "(bad)", "[abstract]")]


@pytest.mark.parametrize(
    "style, dropped",
    [
        ({"rating": "nsfw"}, "nsfw"),
        ({"year": "oldest"}, "oldest"),
        ({"year": "early"}, "early"),
        ({"aesthetic": "displeasing"}, "displeasing"),
    ],
)
def test_official_negative_never_fights_a_chosen_special_tag(style, dropped):
    pos, neg = build_prompt("1girl", "", PromptStyle(**style))
    assert dropped in split_tags(pos)
    assert dropped not in split_tags(neg)
    assert len(split_tags(neg)) == len(split_tags(ANIMAGINE_NEGATIVE)) - 1


def test_official_negative_skips_tags_the_user_asks_for():
    neg = negative("", prompt="1girl, abstract, (text:1.1)")
    assert "[abstract]" not in split_tags(neg) and "text" not in split_tags(neg)


def test_users_own_negative_is_never_removed():
    # the user's choice, even when it contradicts the rating: only the official list yields
    assert negative("nsfw, lowres", rating="explicit").startswith("nsfw, lowres, (bad), text")


# --- idempotence -----------------------------------------------------------------------------

PROMPTS = [
    ("1girl, solo", ""),
    ("", ""),
    ("1girl, (masterpiece:1.2), best_quality, 1girl", "lowres, (worst quality:1.4)"),
    (r"hatsune miku \(cosplay\), vocaloid, (red hair, blue eyes:1.2)", "bad hands, nsfw"),
    ("aesthetic, 1girl, newest", "(bad), [abstract], displeasing"),
    ("1girl BREAK solo, BREAK, smile, <lora:x:0.8>", "text, text"),
    ("初音ミク, 1girl, 🎉", "低品質"),
    ("very aesthetic, displeasing", "oldest"),
    (":(, >_<, (a, b], solo", "a\\,b"),
]
STYLES = [
    PromptStyle(quality_tags=q, aesthetic=a, year=y, rating=r, default_negative=n)
    for q, a, y, r, n in itertools.product(
        (True, False), ("",) + AESTHETIC_TAGS, ("",) + YEAR_TAGS, ("",) + RATING_TAGS, (True, False)
    )
]


@pytest.mark.parametrize("prompt, neg", PROMPTS)
def test_building_a_built_prompt_changes_nothing(prompt, neg):
    for style in STYLES:
        once = build_prompt(prompt, neg, style)
        assert build_prompt(*once, style) == once, style


def test_building_with_a_weaker_style_keeps_what_a_stronger_one_added():
    built = build_prompt("1girl", "", PromptStyle(rating="safe", year="newest"))
    assert build_prompt(*built, PLAIN) == built
