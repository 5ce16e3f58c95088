"""Tag rules: templates, trigger, special tags, escaping, kaomoji, de-duplication, existing-caption
policies, aesthetic thresholds and the aesthetic scorer on a tiny random ViT."""

from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from studio.captioning.tag_rules import (
    ANIMA_QUALITY,
    ANIMAGINE_QUALITY,
    CHARACTER,
    COUNT,
    GENERAL,
    SERIES,
    AestheticScorer,
    TagRules,
    aesthetic_tag,
    anima_score_tag,
    build_caption,
    caption_parts,
    clean_tag,
    dedupe_tags,
    escape_parentheses,
    join_caption,
    merge_existing,
    rating_tag,
    split_caption,
    tag_key,
    year_tags,
)
from studio.errors import ConfigError, ModelNotFoundError, StudioError
from studio.schemas import validate


@dataclass
class FakeResult:
    """Shaped like studio.captioning.tagger.TagResult: names with spaces, unescaped."""

    rating: tuple[str, float] | None = ("general", 0.9)
    characters: list[tuple[str, float]] = field(default_factory=list)
    general: list[tuple[str, float]] = field(default_factory=list)


def result(general=(), characters=(), rating="general") -> FakeResult:
    return FakeResult(
        rating=(rating, 0.9) if rating else None,
        characters=[(t, 0.9) for t in characters],
        general=[(t, 0.5) for t in general],
    )


def caption(res: FakeResult, **rules) -> str:
    return join_caption(build_caption(res, TagRules(**rules)))


SABER = result(
    general=["solo", "1girl", "blonde hair", "armor", "ahoge", "^_^"],
    characters=["saber (fate)"],
    rating="questionable",
)


# --- templates --------------------------------------------------------------------------------


def test_animagine_template_orders_count_character_series_general_then_special_tags():
    got = caption(
        SABER,
        template="animagine",
        trigger="sbr_lora",
        year=2019,
        quality=["best quality"],
        aesthetic_score=0.5,
    )
    assert got == (
        r"sbr_lora, 1girl, saber \(fate\), fate \(series\), solo, blonde hair, armor, ahoge, ^_^, "
        "nsfw, recent, aesthetic, best quality"
    )


def test_anima_template_puts_special_tags_first_and_artists_with_at():
    got = caption(
        SABER,
        template="anima",
        trigger="sbr_lora",
        year=2019,
        quality=["masterpiece", "best quality"],
        aesthetic_score=0.5,
        artists=["Takeuchi_Takashi"],
    )
    assert got == (
        r"sbr_lora, year 2019, recent, masterpiece, best quality, score_5, nsfw, 1girl, saber \(fate\), "
        r"fate \(series\), @takeuchi takashi, solo, blonde hair, armor, ahoge, ^_^"
    )


def test_none_template_keeps_the_taggers_order():
    got = caption(SABER, template="none", trigger="sbr_lora")
    assert (
        got == r"sbr_lora, saber \(fate\), fate \(series\), solo, 1girl, blonde hair, armor, ahoge, ^_^, nsfw"
    )
    with_rules = caption(
        SABER, template="none", series=["type-moon"], artists=["takeuchi takashi"], rating_from_tagger=False
    )
    assert with_rules == (
        r"saber \(fate\), fate \(series\), solo, 1girl, blonde hair, armor, ahoge, ^_^, "
        "type-moon, takeuchi takashi"
    )


def test_anima_lowercases_everything_but_the_trigger():
    res = result(general=["Red_Bow", "1girl"], characters=["Hatsune Miku"])
    assert caption(res, template="anima", trigger="MikuV2", rating_from_tagger=False) == (
        "MikuV2, 1girl, hatsune miku, red bow"
    )
    assert caption(res, template="animagine", rating_from_tagger=False) == "1girl, Hatsune Miku, Red Bow"


def test_the_taggers_own_result_type_works():
    from studio.captioning.tagger import TagResult

    res = TagResult(("sensitive", 0.7), [("hakurei reimu", 0.95)], [("1girl", 0.99), ("red bow", 0.8)])
    assert caption(res, template="anima", trigger="ohwx") == "ohwx, sensitive, 1girl, hakurei reimu, red bow"


@pytest.mark.parametrize(
    "count_tag",
    ["1girl", "1boy", "1other", "2girls", "5boys", "6+girls", "6+others", "multiple girls", "no humans"],
)
def test_count_tags_lead_the_animagine_body(count_tag):
    res = result(general=["smile", count_tag], characters=["hakurei reimu"], rating=None)
    assert build_caption(res, TagRules())[:3] == [count_tag, "hakurei reimu", "smile"]


# --- trigger ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["animagine", "anima", "none"])
def test_trigger_is_first_in_every_template_and_not_repeated(template):
    res = result(general=["1girl", "OHWX", "smile"], characters=["hakurei reimu"])
    tags = build_caption(res, TagRules(template=template, trigger="ohwx", quality=["masterpiece"], year=2024))
    assert tags[0] == "ohwx"
    assert [tag_key(t) for t in tags].count("ohwx") == 1


def test_trigger_with_a_comma_is_refused():
    with pytest.raises(ConfigError, match="comma"):
        validate(TagRules, {"trigger": "a, b"})


# --- special tags -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "year, word",
    [
        (2030, "newest"),
        (2025, "newest"),
        (2021, "newest"),
        (2020, "recent"),
        (2018, "recent"),
        (2017, "mid"),
        (2015, "mid"),
        (2014, "early"),
        (2011, "early"),
        (2010, "oldest"),
        (2005, "oldest"),
        (1999, "oldest"),
    ],
)
def test_year_periods(year, word):
    assert year_tags(year, "animagine") == [word]
    assert year_tags(year, "anima") == [f"year {year}", "old" if word == "oldest" else word]


@pytest.mark.parametrize(
    "wd, model",
    [("general", "safe"), ("sensitive", "sensitive"), ("questionable", "nsfw"), ("explicit", "explicit")],
)
def test_wd_ratings_map_to_the_models_words(wd, model):
    assert rating_tag(wd) == model
    assert build_caption(result(general=["1girl"], rating=wd), TagRules())[-1] == model


def test_fixed_rating_wins_and_the_tagger_rating_can_be_turned_off():
    res = result(general=["1girl"], rating="explicit")
    assert caption(res, rating="safe") == "1girl, safe"
    assert caption(res, rating_from_tagger=False) == "1girl"
    with pytest.raises(ConfigError, match="unknown rating"):
        rating_tag("spicy")


@pytest.mark.parametrize(
    "score, tag",
    [
        (1.0, "very aesthetic"),
        (0.72, "very aesthetic"),
        (0.71, "aesthetic"),
        (0.46, "aesthetic"),
        (0.45, "displeasing"),
        (0.28, "displeasing"),
        (0.27, "very displeasing"),
        (0.0, "very displeasing"),
    ],
)
def test_aesthetic_thresholds(score, tag):
    assert aesthetic_tag(score) == tag


@pytest.mark.parametrize(
    "score, tag",
    [
        (0.0, "score_1"),
        (0.11, "score_1"),
        (0.12, "score_2"),
        (0.5, "score_5"),
        (0.99, "score_9"),
        (1.0, "score_9"),
    ],
)
def test_anima_score_tags(score, tag):
    assert anima_score_tag(score) == tag


def test_per_image_aesthetic_overrides_the_dataset_one_and_fixed_score_wins_on_anima():
    res = result(general=["1girl"], rating=None)
    rules = TagRules(aesthetic_score=0.9)
    assert build_caption(res, rules)[-1] == "very aesthetic"
    assert build_caption(res, rules, aesthetic_score=0.1)[-1] == "very displeasing"
    anima = TagRules(template="anima", score=7, aesthetic_score=0.1)
    assert build_caption(res, anima) == ["score_7", "1girl"]


def test_quality_vocabulary_is_checked_per_model():
    assert "great quality" in ANIMAGINE_QUALITY and "great quality" not in ANIMA_QUALITY
    TagRules(template="animagine", quality=["great quality"])
    with pytest.raises(ConfigError, match="not a quality tag of Anima"):
        validate(TagRules, {"template": "anima", "quality": ["great quality"]})
    with pytest.raises(ValidationError, match="belong to Anima"):
        TagRules(template="animagine", score=7)


def test_special_tags_already_in_the_tags_are_not_repeated():
    res = result(general=["1girl", "masterpiece", "safe"])
    assert caption(res, quality=["masterpiece"]) == "1girl, masterpiece, safe"


# --- escaping, kaomoji, de-duplication --------------------------------------------------------


@pytest.mark.parametrize(
    "raw, escaped",
    [
        ("saber (fate)", r"saber \(fate\)"),
        (r"saber \(fate\)", r"saber \(fate\)"),  # never double-escaped
        (r"a \(b) (c\)", r"a \(b\) \(c\)"),
        ("plain", "plain"),
    ],
)
def test_escape_parentheses(raw, escaped):
    assert escape_parentheses(raw) == escaped
    assert escape_parentheses(escape_parentheses(raw)) == escaped


def test_escape_off_writes_bare_parentheses():
    res = result(general=[r"hatsune miku \(cosplay\)"], characters=["saber (fate)"], rating=None)
    assert caption(res, escape=False) == "saber (fate), fate (series), hatsune miku (cosplay)"


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("^_^", "^_^"),
        (">_<", ">_<"),
        ("x_x", "x_x"),
        ("0_0", "0_0"),
        ("(o)_(o)", r"\(o\)_\(o\)"),
        ("long_hair", "long hair"),
        ("looking_at__viewer ", "looking at viewer"),
    ],
)
def test_underscores_become_spaces_except_in_kaomoji(raw, cleaned):
    assert clean_tag(raw) == cleaned


def test_dedupe_keeps_the_first_occurrence_across_case_underscores_and_escapes():
    tags = ["Long_Hair", "smile", "long hair", r"saber \(fate\)", "saber (fate)", "SMILE"]
    assert dedupe_tags(tags) == ["Long_Hair", "smile", r"saber \(fate\)"]
    res = result(general=["smile", "long hair", "smile", "long_hair"], rating=None)
    assert caption(res) == "smile, long hair"


def test_split_and_join_caption():
    assert split_caption("1girl,  solo\nsmile, , a\\, b") == ["1girl", "solo", "smile", "a\\, b"]
    assert join_caption(["1girl", "solo"]) == "1girl, solo"


# --- series, artists, exclusions --------------------------------------------------------------


def test_series_from_the_qualifier_table_the_users_mapping_and_the_dataset_list():
    res = result(
        general=["1girl"],
        characters=["hakurei reimu", "lumine (genshin impact)", "foo (cosplay)"],
        rating=None,
    )
    assert caption(res) == r"1girl, hakurei reimu, lumine \(genshin impact\), foo \(cosplay\), genshin impact"
    mapped = caption(res, character_series={"Hakurei_Reimu": "touhou"}, series=["my series"])
    assert mapped == (
        r"1girl, hakurei reimu, lumine \(genshin impact\), foo \(cosplay\), my series, touhou, genshin impact"
    )


def test_a_known_series_tag_among_general_tags_moves_to_the_series_section():
    res = result(general=["smile", "touhou", "1girl"], characters=["hakurei reimu"], rating=None)
    assert caption(res, series=["touhou"]) == "1girl, hakurei reimu, touhou, smile"
    parts = caption_parts(res, TagRules(series=["touhou"]))
    assert parts.texts(SERIES) == ["touhou", "touhou"]  # dataset list + the tagger's (deduped on write)
    assert parts.texts(COUNT) == ["1girl"] and parts.texts(CHARACTER) == ["hakurei reimu"]
    assert parts.texts(GENERAL) == ["smile"]


def test_artists_anima_at_prefix_animagine_plain():
    res = result(general=["1girl", "@ke-ta", "smile"], rating=None)
    assert caption(res, template="anima", artists=["wlop"]) == "1girl, @wlop, @ke-ta, smile"
    assert caption(res, template="animagine", artists=["@wlop"]) == "1girl, wlop, ke-ta, smile"


def test_exclude_exact_and_wildcard():
    res = result(general=["1girl", "white background", "simple background", "smile", "Solo"], rating=None)
    assert caption(res, exclude=["* background", "solo"]) == "1girl, smile"


def test_a_copy_with_other_rules_is_compiled_afresh():
    res = result(general=["1girl"], rating=None)
    rules = TagRules(trigger="a")
    assert build_caption(res, rules)[0] == "a"
    assert build_caption(res, rules.model_copy(update={"trigger": "b"}))[0] == "b"
    assert build_caption(res, rules)[0] == "a"


# --- existing captions ------------------------------------------------------------------------

EXISTING = ["ohwx", "1girl", "red dress"]
NEW = ["ohwx", "1girl", "smile", "Red_Dress", "outdoors"]


def test_skip_leaves_a_captioned_image_alone_but_fills_an_empty_one():
    assert merge_existing(EXISTING, NEW, "skip") is None
    assert merge_existing([], NEW, "skip") == ["ohwx", "1girl", "smile", "Red_Dress", "outdoors"]
    assert merge_existing(["  "], ["a", "a"], "skip") == ["a"]


def test_append_prepend_overwrite():
    assert merge_existing(EXISTING, NEW, "append") == ["ohwx", "1girl", "red dress", "smile", "outdoors"]
    assert merge_existing(EXISTING, NEW, "prepend") == ["ohwx", "1girl", "smile", "Red_Dress", "outdoors"]
    assert merge_existing(EXISTING, NEW, "overwrite") == NEW


def test_merge_keeps_the_trigger_first():
    merged = merge_existing(["1girl", "smile"], ["sks", "1girl", "hat"], "append", trigger="sks")
    assert merged == ["sks", "1girl", "smile", "hat"]


def test_unknown_policy_is_refused():
    with pytest.raises(ConfigError, match="skip, append, prepend, overwrite"):
        merge_existing([], [], "merge")


# --- aesthetic scorer on a tiny random ViT ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A 2-label ViT image classifier with random weights and a PIL image processor, offline."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "lq", 1: "hq"},
        label2id={"lq": 0, "hq": 1},
    )
    ViTForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _images():
    from PIL import Image

    rgba = Image.new("RGBA", (40, 24), (0, 0, 255, 128))
    return [Image.new("RGB", (64, 48), (220, 20, 20)), Image.new("RGB", (30, 50), (10, 200, 10)), rgba]


def _reference_scores(folder, images, label_id):
    """The positive label's softmax probability, computed without the pipeline."""
    import torch
    from transformers import ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    model = ViTForImageClassification.from_pretrained(folder).eval()
    processor = ViTImageProcessorPil.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**processor([i.convert("RGB") for i in images], return_tensors="pt")).logits
    return logits.softmax(-1)[:, label_id].tolist()


def test_aesthetic_scorer_returns_the_positive_labels_probability(tiny_vit, tmp_path):
    images = _images()
    scorer = AestheticScorer(tiny_vit, batch_size=2)
    scores = scorer.score(images)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores == pytest.approx(_reference_scores(tiny_vit, images, label_id=1), abs=1e-5)
    assert len({round(s, 6) for s in scores}) > 1  # the images differ, so do their scores

    path = tmp_path / "a.png"
    images[0].save(path)
    assert scorer.score([path]) == pytest.approx(scores[:1], abs=1e-5)

    lq = AestheticScorer(tiny_vit, positive_label="LQ").score(images)
    assert lq == pytest.approx([1 - s for s in scores], abs=1e-5)


def test_aesthetic_scorer_label_errors(tiny_vit, tmp_path):
    with pytest.raises(ConfigError, match="no label 'pretty'"):
        AestheticScorer(tiny_vit, positive_label="pretty").load()

    import json

    config = json.loads((tiny_vit / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "cat", "1": "dog"}, {"cat": 0, "dog": 1}
    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_vit.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(StudioError, match="cannot tell which label"):
        AestheticScorer(other).load()
    with pytest.raises(ModelNotFoundError, match="cannot load the aesthetic model"):
        AestheticScorer(tmp_path / "missing").load()
