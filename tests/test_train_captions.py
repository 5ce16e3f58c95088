"""Per-step caption sampling: kohya's scheme and the mixed NL/tag scheme, measured over thousands
of seeded draws (so every statistic is exact and repeatable), plus the caching truth table."""

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from studio.errors import ConfigError, DatasetError
from studio.training.captions import (
    CaptionSampler,
    KohyaCaptionConfig,
    KohyaCaptionSampler,
    MixedCaptionConfig,
    MixedCaptionSampler,
    fixed_dropout_count,
    join_parts,
    split_sentences,
)

BODY = [f"tag{i}" for i in range(20)]
NL = ("An illustration of Miku from Vocaloid. She sings on stage! The lights are blue. Is it night? "
      "Yes, it is.")
SENTENCES = ["An illustration of Miku from Vocaloid.", "She sings on stage!", "The lights are blue.",
             "Is it night?", "Yes, it is."]
TAGS_ONLY = {"weight_nl": 0, "weight_tags_nl": 0, "weight_nl_tags": 0}
NL_ONLY = {"weight_tags": 0, "weight_nl": 1, "weight_tags_nl": 0, "weight_nl_tags": 0}
FIXED_TAGS = {"shuffle_tags": False, "tag_dropout": 0}


def kohya(**options) -> KohyaCaptionSampler:
    return CaptionSampler.from_config(KohyaCaptionConfig(**options))


def mixed(**options) -> MixedCaptionSampler:
    return CaptionSampler.from_config(MixedCaptionConfig(**options))


def draws(sampler, tags, nl="", n=2000, seed=0, **kw) -> list[str]:
    rng = random.Random(seed)
    return [sampler.sample(tags, nl, rng, **kw) for _ in range(n)]


def as_tags(caption: str) -> list[str]:
    return caption.split(", ") if caption else []


# --- kohya --------------------------------------------------------------------------------------


def test_kohya_static_caption_glues_prefix_and_suffix_with_a_space_like_kohya():
    tags = ["1girl", "solo"]
    sampler = kohya(caption_prefix="masterpiece,", caption_suffix=", anime screencap")
    assert sampler.static_caption(tags, "") == "masterpiece, 1girl, solo, anime screencap"
    # kohya joins with a space, so a prefix without its comma merges into the first tag
    assert kohya(caption_prefix="trigger").static_caption(tags, "") == "trigger 1girl, solo"
    assert kohya().static_caption(tags, "ignored NL") == "1girl, solo"


def test_kohya_keep_tokens_head_never_moves_nor_drops_while_the_body_shuffles():
    sampler = kohya(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=0.5)
    tags = ["trigger", "1girl", *BODY]
    orders = set()
    for caption in draws(sampler, tags):
        got = as_tags(caption)
        assert got[:2] == ["trigger", "1girl"]
        assert set(got[2:]) <= set(BODY)
        orders.add(tuple(got[2:]))
    assert len(orders) > 1000  # shuffled and dropped, not a fixed order


def test_kohya_separator_wins_over_keep_tokens_and_a_second_one_makes_a_fixed_tail():
    # kohya's own example (docs/config_README-en.md), as the dataset reads it: split on commas
    tags = ["1girl", "hatsune miku", "vocaloid ||| stage", "microphone", "white shirt",
            "smile ||| best quality", "rating: general"]
    sampler = kohya(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.9)
    body_seen = Counter()
    for caption in draws(sampler, tags, n=500):
        got = as_tags(caption)
        assert got[:3] == ["1girl", "hatsune miku", "vocaloid"]
        assert got[-2:] == ["best quality", "rating: general"]
        assert "|||" not in caption
        body_seen.update(got[3:-2])
    assert set(body_seen) == {"stage", "microphone", "white shirt", "smile"}


def test_kohya_separators_are_removed_even_when_nothing_is_random():
    tags = ["1girl", "miku ||| stage", "smile ||| best quality"]
    assert kohya().static_caption(tags, "") == "1girl, miku, stage, smile, best quality"
    # the separator may come from the suffix too, as in kohya's docs
    sampler = kohya(caption_suffix=", anime screencap ||| masterpiece", shuffle_caption=True)
    assert all(c.endswith(", masterpiece") for c in draws(sampler, ["a", "b", "c"], n=50))


def test_kohya_a_third_separator_is_refused_with_a_clear_message():
    sampler = kohya(shuffle_caption=True)
    tags = ["a ||| b ||| c ||| d"]
    assert "at most two" in sampler.caption_problem(tags)
    assert sampler.caption_problem(["a ||| b ||| c"]) is None
    with pytest.raises(DatasetError, match="3 '\\|\\|\\|' separators"):
        sampler.sample(tags, "", random.Random(0))


def test_kohya_tag_dropout_is_an_independent_coin_per_body_tag():
    sampler = kohya(caption_tag_dropout_rate=0.3, keep_tokens=1)
    captions = draws(sampler, ["trigger", *BODY], n=4000)
    kept = Counter(tag for c in captions for tag in as_tags(c))
    assert kept["trigger"] == 4000
    for tag in BODY:
        assert abs(kept[tag] / 4000 - 0.7) < 0.03, tag
    sizes = Counter(len(as_tags(c)) for c in captions)
    assert len(sizes) >= 8  # a coin per tag: the number kept varies (a fixed fraction would not)


def test_kohya_whole_caption_dropout_rate_drops_the_head_too():
    captions = draws(kohya(caption_dropout_rate=0.2, keep_tokens=1), ["trigger", "solo"], n=5000)
    assert abs(captions.count("") / 5000 - 0.2) < 0.015
    assert set(captions) == {"", "trigger, solo"}


def test_kohya_every_n_epochs_drops_every_caption_of_those_epochs():
    sampler = kohya(caption_dropout_every_n_epochs=3)
    rng = random.Random(0)
    assert [sampler.sample(["a"], "", rng, epoch=e) for e in (1, 2, 3, 4, 6)] == ["a", "a", "", "a", ""]
    for bad in (None, 0):
        with pytest.raises(ValueError, match="epoch counted from 1"):
            sampler.sample(["a"], "", rng, epoch=bad)


def test_kohya_draws_in_kohyas_order():
    """caption dropout coin, then shuffle of the body, then one coin per body tag: the same RNG
    state gives the same caption as this step-by-step replay of sd-scripts' process_caption."""
    sampler = kohya(caption_dropout_rate=0.1, shuffle_caption=True, keep_tokens=1,
                    caption_tag_dropout_rate=0.25)
    tags = ["trigger", *BODY]
    for seed in range(200):
        replay = random.Random(seed)
        if replay.random() < 0.1:
            expected = ""
        else:
            body = list(BODY)
            replay.shuffle(body)
            expected = ", ".join(["trigger"] + [t for t in body if replay.random() >= 0.25])
        assert sampler.sample(tags, "", random.Random(seed)) == expected


# --- mixed: variants ------------------------------------------------------------------------------


def test_mixed_variant_frequencies_follow_the_weights():
    tags = ["trigger", "solo"]
    nl = "A girl smiles."
    names = {"trigger, solo": "tags", "A girl smiles.": "nl", "trigger, solo. A girl smiles.": "tags_nl",
             "A girl smiles. trigger, solo": "nl_tags"}
    for weights, expected in [
        ({}, {"tags": 0.5, "nl": 0.1, "tags_nl": 0.2, "nl_tags": 0.2}),
        ({"weight_tags": 1, "weight_nl": 1, "weight_tags_nl": 0, "weight_nl_tags": 2},
         {"tags": 0.25, "nl": 0.25, "tags_nl": 0.0, "nl_tags": 0.5}),
    ]:
        sampler = mixed(tag_dropout=0, shuffle_tags=False, **weights)
        counts = Counter(names[c] for c in draws(sampler, tags, nl, n=10000))
        for variant, share in expected.items():
            assert abs(counts[variant] / 10000 - share) < 0.015, (weights, variant, counts)


@pytest.mark.parametrize("missing", ["", "   \n", None])
def test_mixed_without_nl_always_trains_on_the_tags(missing):
    sampler = mixed(tag_dropout=0, shuffle_tags=False)
    assert set(draws(sampler, ["trigger", "solo"], missing, n=500)) == {"trigger, solo"}
    # even when the run gives the tags no weight (an NL-only run): the image falls back to tags
    nl_only = mixed(**FIXED_TAGS, **NL_ONLY)
    assert set(draws(nl_only, ["trigger", "solo"], missing, n=50)) == {"trigger, solo"}
    assert set(draws(nl_only, ["trigger", "solo"], "A girl.", n=50)) == {"A girl."}


def test_mixed_without_tags_trains_on_the_nl():
    assert set(draws(mixed(), [], "A girl smiles.", n=200)) == {"A girl smiles."}


def test_mixed_whole_caption_dropout_rate():
    captions = draws(mixed(caption_dropout_rate=0.1), ["a", "b", "c", "d"], "A girl.", n=5000)
    assert abs(captions.count("") / 5000 - 0.1) < 0.012


def test_joining_tags_and_nl():
    assert join_parts("1girl, solo", "A girl smiles.", ". ") == "1girl, solo. A girl smiles."
    assert join_parts("A girl smiles.", "1girl, solo", ". ") == "A girl smiles. 1girl, solo"
    assert join_parts("Is she happy?", "1girl", ". ") == "Is she happy? 1girl"
    assert join_parts("1girl, solo", "A girl.", "\n") == "1girl, solo\nA girl."
    assert join_parts("A girl.", "1girl", ".\n") == "A girl.\n1girl"
    assert join_parts("", "A girl.", ". ") == "A girl."
    sampler = mixed(nl_separator="\n", weight_tags=0, weight_nl=0, weight_tags_nl=1, weight_nl_tags=0,
                    tag_dropout=0, shuffle_tags=False)
    assert sampler.static_caption(["a", "b"], "A girl.") == "a, b\nA girl."


# --- mixed: tags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "droppable", "fraction", "min_tags", "expected"), [
    (13, 10, 0.3, 3, 3),
    (10, 10, 0.25, 0, 2),  # 2.5 -> 2 (halves round to even, Python's round)
    (10, 10, 0.35, 0, 4),  # 3.5 -> 4
    (5, 5, 1.0, 3, 2),  # the floor: 3 of 5 stay
    (3, 3, 0.9, 3, 0),
    (2, 2, 0.5, 3, 0),  # already under the floor: nothing dropped
    (20, 0, 0.5, 0, 0),
])
def test_fixed_dropout_count(total, droppable, fraction, min_tags, expected):
    assert fixed_dropout_count(total, droppable, fraction, min_tags) == expected


def test_mixed_tag_dropout_drops_exactly_a_fixed_fraction_and_never_the_head_or_protected():
    head = ["trigger", "1girl", "hatsune miku"]
    protected = "Saber_(Fate)"  # written differently from the caption's tag: compared by tag_key
    body = [f"tag{i}" for i in range(9)] + ["saber \\(fate\\)"] + [f"tag{i}" for i in range(9, 12)]
    sampler = mixed(**TAGS_ONLY, keep_first=3, protected_tags=[protected],
                    tag_dropout=0.3, min_tags=3)
    dropped = Counter()
    for caption in draws(sampler, head + body, n=3000):
        got = as_tags(caption)
        assert len(got) == 3 + 13 - round(0.3 * 12)  # exactly 4 of the 12 droppable tags, every time
        assert got[:3] == head
        assert "saber \\(fate\\)" in got
        dropped.update(set(body) - set(got))
    assert "saber \\(fate\\)" not in dropped
    for tag in body[:9] + body[10:]:
        assert abs(dropped[tag] / 3000 - 4 / 12) < 0.03, tag


def test_mixed_tag_dropout_never_goes_below_min_tags():
    sampler = mixed(**TAGS_ONLY, keep_first=0, tag_dropout=1.0, min_tags=3, shuffle_tags=False)
    tags = ["a", "b", "c", "d", "e", "f"]
    results = draws(sampler, tags, n=500)
    assert all(len(as_tags(c)) == 3 for c in results)
    assert len(set(results)) > 1  # which 3 survive is random
    assert set(draws(sampler, ["a", "b"], n=20)) == {"a, b"}  # already under the floor


def test_mixed_shuffle_moves_only_droppable_tags():
    tags = ["trigger", "t1", "t2", "keep me", "t3", "t4", "t5"]
    sampler = mixed(**TAGS_ONLY, keep_first=1, protected_tags=["keep me"],
                    tag_dropout=0, shuffle_tags=True)
    orders = set()
    for caption in draws(sampler, tags, n=1000):
        got = as_tags(caption)
        assert got[0] == "trigger" and got[3] == "keep me"
        assert sorted(got) == sorted(tags)
        orders.add(tuple(got))
    assert len(orders) == 120  # every order of the 5 droppable tags shows up


def test_mixed_head_is_kept_when_keep_first_exceeds_the_tags():
    sampler = mixed(**TAGS_ONLY, keep_first=5, tag_dropout=1.0, min_tags=0)
    assert set(draws(sampler, ["a", "b", "c"], n=50)) == {"a, b, c"}


# --- mixed: NL ----------------------------------------------------------------------------------------


def test_split_sentences_keeps_punctuation():
    assert split_sentences(NL) == SENTENCES
    assert split_sentences("Version 3.5 is out.\nIt works!") == ["Version 3.5 is out.", "It works!"]


def test_sentence_shuffle_keeps_the_first_sentence_first():
    sampler = mixed(**NL_ONLY, shuffle_sentences=True)
    orders = set()
    for caption in draws(sampler, ["a"], NL, n=1000):
        got = split_sentences(caption)
        assert got[0] == SENTENCES[0]
        assert sorted(got) == sorted(SENTENCES)
        orders.add(tuple(got))
    assert len(orders) == 24  # all 4! orders of the other sentences
    unshuffled = mixed(**NL_ONLY, shuffle_sentences=False)
    assert set(draws(unshuffled, ["a"], NL, n=50)) == {NL}


# --- determinism and caching ------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [
    kohya(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.2, caption_dropout_rate=0.1),
    mixed(shuffle_sentences=True, caption_dropout_rate=0.05),
], ids=["kohya", "mixed"])
def test_same_seed_same_captions(sampler):
    tags = ["trigger", *BODY]
    first, again, other = (draws(sampler, tags, NL, n=100, seed=s) for s in (123, 123, 124))
    assert first == again
    assert first != other


@pytest.mark.parametrize(("sampler", "causes"), [
    (kohya(), []),
    (kohya(keep_tokens=2, caption_prefix="masterpiece, "), []),
    (kohya(shuffle_caption=True), ["shuffle_caption"]),
    (kohya(caption_tag_dropout_rate=0.1), ["caption_tag_dropout_rate"]),
    (kohya(caption_dropout_rate=0.05), ["caption_dropout_rate"]),
    (kohya(caption_dropout_every_n_epochs=2), ["caption_dropout_every_n_epochs"]),
    (mixed(), ["mixed variants tags/nl/tags_nl/nl_tags", "shuffle_tags", "tag_dropout"]),
    (mixed(**TAGS_ONLY, **FIXED_TAGS), []),
    (mixed(**FIXED_TAGS, weight_tags=0, weight_nl=0, weight_nl_tags=0), []),  # tags_nl only
    (mixed(**TAGS_ONLY, **FIXED_TAGS, shuffle_sentences=True), []),  # no variant uses the NL
    (mixed(**NL_ONLY, **FIXED_TAGS, shuffle_sentences=True), ["shuffle_sentences"]),
    (mixed(**FIXED_TAGS, weight_nl=0, weight_tags_nl=0), ["mixed variants tags/nl_tags"]),
    (mixed(**TAGS_ONLY, shuffle_tags=True, tag_dropout=0), ["shuffle_tags"]),
    (mixed(**TAGS_ONLY, shuffle_tags=False, tag_dropout=0.2), ["tag_dropout"]),
    (mixed(**TAGS_ONLY, **FIXED_TAGS, caption_dropout_rate=0.1), ["caption_dropout_rate"]),
])
def test_caching_truth_table(sampler, causes):
    assert sampler.variation_causes() == causes
    assert sampler.varies_per_step is bool(causes)
    reason = sampler.cache_refusal_reason()
    if not causes:
        assert reason is None
        tags = ["trigger", *BODY]  # many tags and sentences: any draw would show
        assert {sampler.sample(tags, NL, random.Random(seed)) for seed in range(30)} == {
            sampler.static_caption(tags, NL)}
    else:
        assert reason.startswith("text-encoder output caching is off: the captions change from step to step")
        assert all(cause in reason for cause in causes) and reason.endswith("turn those off to cache")
        with pytest.raises(ConfigError, match="caching is off"):
            sampler.static_caption(["a", "b"], "A girl.")


# --- configs ----------------------------------------------------------------------------------------


def test_configs_are_validated():
    with pytest.raises(ValidationError, match="every variant weight is 0"):
        MixedCaptionConfig(weight_tags=0, weight_nl=0, weight_tags_nl=0, weight_nl_tags=0)
    with pytest.raises(ValidationError, match="without commas"):
        KohyaCaptionConfig(keep_tokens_separator=",")
    with pytest.raises(ValidationError, match="Extra inputs"):
        KohyaCaptionConfig(shuffle_captions=True)
    with pytest.raises(ValidationError):
        MixedCaptionConfig(tag_dropout=1.5)
    assert MixedCaptionConfig().weights() == {"tags": 50, "nl": 10, "tags_nl": 20, "nl_tags": 20}
    no_separator = KohyaCaptionConfig(keep_tokens_separator="")
    assert isinstance(CaptionSampler.from_config(no_separator), KohyaCaptionSampler)
    with pytest.raises(TypeError):
        CaptionSampler.from_config({"shuffle_caption": True})


def test_the_shipped_anima_character_preset_hits_its_weights_and_dropout():
    """The statistics on the real preset, not on hand-made configs: variant shares within a few
    percent of 50/10/20/20, exactly round(0.3 * droppable) tags dropped, the first three kept."""
    import random
    from collections import Counter

    from studio.training.runs import resolve_config

    config = resolve_config(preset="anima-character", overrides={"datasets": [{"path": "unused"}]})
    sampler = CaptionSampler.from_config(config.caption_config())
    head = ["ohwx", "hakurei reimu", "touhou"]
    tags = head + [f"tag{i}" for i in range(10)]
    nl = "An illustration of Hakurei Reimu from Touhou. She smiles at a shrine."
    rng, variants, draws = random.Random(0), Counter(), 4000
    for _ in range(draws):
        caption = sampler.sample(tags, nl, rng)
        starts_nl, has_tags = caption.startswith("An illustration"), "tag" in caption
        variants["nl" if starts_nl and not has_tags else "nl_tags" if starts_nl else
                 "tags_nl" if "Hakurei Reimu from" in caption else "tags"] += 1
        if has_tags:
            tag_part = caption.replace(nl, "").strip(". ")
            kept = tag_part.split(", ")
            assert kept[:3] == head, caption
            assert sum(t.startswith("tag") for t in kept) == 10 - round(0.3 * 10), caption
    expected = {"tags": 0.5, "nl": 0.1, "tags_nl": 0.2, "nl_tags": 0.2}
    for variant, share in expected.items():
        assert abs(variants[variant] / draws - share) < 0.03, (variant, variants)
