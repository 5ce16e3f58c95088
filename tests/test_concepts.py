"""Concepts and the dataset audit on constructed datasets with known answers: a kohya dataset of
two characters (one well captioned with a mislabelled image, a caption naming the other character
and a missing trigger; one with too few images and a copy of the first's image), a flat dataset
found by character tags, trigger words or its leading tag, the saved concept list, balancing in
training, and `python -m studio audit`."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from studio.dataset.audit import audit_dataset
from studio.dataset.concepts import (
    ConceptSpec,
    Entry,
    build_report,
    dataset_concepts,
    discover,
    save_specs,
    saved_specs,
    spec_from_json,
)
from studio.dataset.dataset import Dataset
from studio.errors import DatasetError

AMIYA = "amiya \\(arknights\\), 1girl, solo, rabbit ears, blue eyes, black jacket, ring"
EMBER = "ember \\(endfield\\), 1girl, red hair, horns, armor"


def image(path, seed: int, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)


def kohya_dataset(root):
    """10_amiya: 12 images, of which a01 lacks the look (mislabel), a02 names ember too, a03 lacks
    the trigger; 3_ember: 4 images, e03 a copy of a00."""
    amiya, ember = root / "10_amiya", root / "3_ember"
    amiya.mkdir(parents=True), ember.mkdir()
    for i in range(12):
        image(amiya / f"a{i:02d}.png", i)
        caption = {1: "amiya \\(arknights\\), 1girl, red dress, long hair, outdoors",
                   2: AMIYA + ", ember \\(endfield\\)",
                   3: AMIYA.replace("amiya \\(arknights\\), ", "")}.get(i, AMIYA)
        (amiya / f"a{i:02d}.txt").write_text(caption)
    for i in range(4):
        image(ember / f"e{i:02d}.png", 100 + i)
        (ember / f"e{i:02d}.txt").write_text(EMBER)
    shutil.copy(amiya / "a00.png", ember / "e03.png")
    return root


def test_repeat_folders_are_concepts_with_triggers_core_tags_and_shares(tmp_path):
    report = dataset_concepts(Dataset.open(kohya_dataset(tmp_path / "data")))
    amiya, ember = report.concepts
    assert (amiya.name, amiya.spec.folder, ember.name) == ("amiya", "10_amiya", "ember")
    assert amiya.triggers == ("amiya \\(arknights\\)",) and ember.triggers == ("ember \\(endfield\\)",)
    assert set(amiya.core_tags) == {"rabbit ears", "blue eyes", "black jacket", "ring"}, "no counts, no triggers"
    assert set(ember.core_tags) == {"red hair", "horns", "armor"}
    assert report.samples_per_epoch == 12 * 10 + 4 * 3
    assert amiya.share == pytest.approx(120 / 132) and ember.share == pytest.approx(12 / 132)
    repeats = report.balanced_repeats()
    shares = {c.name: len(c.images) * repeats[c.name] for c in report.concepts}
    assert repeats == {"amiya": 6, "ember": 18}
    assert shares["amiya"] / sum(shares.values()) == pytest.approx(0.5, abs=0.02), "equal shares by default"


def test_the_audit_finds_the_mislabel_the_foreign_tag_the_missing_trigger_the_small_concept_and_the_copy(tmp_path):
    audit = audit_dataset(Dataset.open(kohya_dataset(tmp_path / "data")))
    found = {(f.kind, f.rel) for f in audit.findings}
    assert found == {
        ("mislabel", "10_amiya/a01.png"),
        ("foreign_tag", "10_amiya/a02.png"),
        ("missing_trigger", "10_amiya/a03.png"),
        ("few_images", ""),
        ("duplicate", "3_ember/e03.png"),
    }
    by_kind = {f.kind: f for f in audit.findings}
    assert "black jacket" in by_kind["mislabel"].message and by_kind["few_images"].concept == "ember"
    assert by_kind["duplicate"].other == "10_amiya/a00.png" and "ember" in by_kind["foreign_tag"].message
    assert audit.summary().startswith("2 concept(s); 5 finding(s)")


def test_a_clean_dataset_has_no_findings(tmp_path):
    root = tmp_path / "clean" / "12_amiya"
    root.mkdir(parents=True)
    for i in range(12):
        image(root / f"{i}.png", i)
        (root / f"{i}.txt").write_text(AMIYA)
    audit = audit_dataset(Dataset.open(root.parent))
    assert audit.findings == () and audit.summary() == "1 concept(s); no findings"


def entries(*captions, folder=""):
    return [Entry(f"{i}.png", folder, 1, tuple(t.strip() for t in c.split(","))) for i, c in enumerate(captions)]


def test_a_flat_dataset_finds_characters_triggers_or_its_leading_tag():
    two = entries(*[AMIYA] * 3, *[EMBER] * 2, "1boy, hat")
    specs = discover(two)
    assert [(s.name, s.source) for s in specs] == [("amiya \\(arknights\\)", "character"),
                                                   ("ember \\(endfield\\)", "character")]
    assert build_report(two, specs).unassigned == ("5.png",)
    # the tagger's own character tags (no qualifier) are found too, and the person's triggers first
    demo = entries("hatsune miku, 1girl, twintails", "hatsune miku, 1girl, twintails", "mychar, 1girl, hat")
    specs = discover(demo, character_tags={"hatsune_miku"}, triggers=["mychar"])
    assert [(s.name, s.source) for s in specs] == [("mychar", "trigger"), ("hatsune miku", "character")]
    # a style dataset: one concept, triggered by the tag leading every caption
    style = entries("mystyle, 1girl, sky", "mystyle, scenery", "mystyle, 1boy")
    (spec,) = discover(style, name="styles")
    assert (spec.name, spec.triggers, spec.source) == ("mystyle", ("mystyle",), "dataset")
    assert discover(entries("1girl, sky", "scenery"), name="styles")[0] == ConceptSpec("styles", (), source="dataset")


def test_the_saved_concept_list_replaces_discovery_and_sets_target_shares(tmp_path):
    dataset = Dataset.open(kohya_dataset(tmp_path / "data"))
    assert saved_specs(dataset.root) is None
    save_specs(dataset.root, [ConceptSpec("amiya", ("amiya \\(arknights\\)",), "10_amiya", 0.75),
                              ConceptSpec("ember", ("ember \\(endfield\\)",), "3_ember")])
    report = dataset_concepts(dataset)
    assert report.targets() == {"amiya": 0.75, "ember": 0.25}
    repeats = report.balanced_repeats()
    assert 12 * repeats["amiya"] / (12 * repeats["amiya"] + 4 * repeats["ember"]) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(DatasetError, match="same name"):
        save_specs(dataset.root, [ConceptSpec("a"), ConceptSpec("a")])
    (dataset.root / ".studio" / "concepts.json").write_text("{not json")
    with pytest.raises(DatasetError, match="delete it to start over"):
        dataset_concepts(dataset)


@pytest.mark.parametrize("bad, message", [
    ({"name": ""}, "needs a name"),
    ({"name": "a", "triggers": ["x"] * 17}, "up to 16"),
    ({"name": "a", "target_share": 1.5}, r"\(0, 1\]"),
    ({"name": "a", "target_share": True}, r"\(0, 1\]"),
    ({"name": "a", "folder": "../x"}, "repeat folder's name"),
])
def test_a_concept_from_a_form_or_a_file_is_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        spec_from_json(bad)
    assert spec_from_json({"name": "a", "triggers": "x, y"}).triggers == ("x", "y")


def test_balance_concepts_gives_each_concept_its_share_of_the_training_epoch(tmp_path):
    from studio.training.config import TrainConfig
    from studio.training.data import collect_samples

    root = kohya_dataset(tmp_path / "data")
    plain = collect_samples(TrainConfig(datasets=[{"path": str(root)}], resolution=64, min_bucket_reso=64))
    balanced = collect_samples(TrainConfig(datasets=[{"path": str(root)}], resolution=64, min_bucket_reso=64,
                                           balance_concepts=True))

    def shares(report):
        amiya = sum(s.repeats for s in report.train if "10_amiya" in str(s.image))
        return amiya / sum(s.repeats for s in report.train)

    assert shares(plain) == pytest.approx(120 / 132)
    assert shares(balanced) == pytest.approx(0.5, abs=0.02)
    assert any("concepts balanced: amiya 12 images x6, ember 4 images x18" in w for w in balanced.warnings)


def test_the_audit_command_prints_concepts_and_findings_and_saves_the_list(tmp_path, capsys):
    from studio.__main__ import main

    root = kohya_dataset(tmp_path / "data")
    code = main(["audit", str(root), "--workspace", str(tmp_path / "ws"), "--save-concepts"])
    out = capsys.readouterr().out
    assert code == 1, "findings: exit 1"
    assert "amiya: 12 images, 91% of an epoch, balanced repeats 6" in out
    assert "[mislabel] 10_amiya/a01.png: lacks" in out and "[duplicate] 3_ember/e03.png" in out
    assert [s.name for s in saved_specs(root)] == ["amiya", "ember"]
    code = main(["audit", str(root), "--json", "--no-duplicates", "--workspace", str(tmp_path / "ws")])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and {f["kind"] for f in data["findings"]} == {"mislabel", "foreign_tag", "missing_trigger",
                                                                    "few_images"}
    assert data["concepts"]["concepts"][1]["balanced_repeats"] == 18
    assert main(["audit", str(tmp_path / "nowhere"), "--workspace", str(tmp_path / "ws")]) == 2


def test_protect_concepts_keeps_every_characters_name_through_tag_dropout(tmp_path):
    """Mixed captions with 90% tag dropout: with protect_concepts, both concepts' triggers survive
    every draw; without it they are dropped about as often as any tag."""
    import random

    from studio.dataset.concepts import run_concepts
    from studio.training.config import TrainConfig, changed_settings
    from studio.training.data import collect_samples
    from studio.training.trainer import _caption_sampler, _concept_tags

    root = kohya_dataset(tmp_path / "data")
    mixed = {"weight_tags": 1, "weight_nl": 0, "weight_tags_nl": 0, "weight_nl_tags": 0, "tag_dropout": 0.9,
             "keep_first": 0, "min_tags": 0}
    config = TrainConfig(datasets=[{"path": str(root)}], resolution=64, min_bucket_reso=64, caption_scheme="mixed",
                         mixed_captions={**mixed, "protect_concepts": True})
    data = collect_samples(config)
    tags = _concept_tags(run_concepts(config), data, frozenset())
    assert tags == ["amiya \\(arknights\\)", "ember \\(endfield\\)"]
    protected, plain = _caption_sampler(config, tags), _caption_sampler(
        config.model_copy(update={"mixed_captions": config.mixed_captions.model_copy(
            update={"protect_concepts": False})}), tags)
    rng = random.Random(0)
    kept = {"protected": 0, "plain": 0}
    for _ in range(200):
        kept["protected"] += "amiya \\(arknights\\)" in protected.sample(AMIYA.split(", "), "", rng)
        kept["plain"] += "amiya \\(arknights\\)" in plain.sample(AMIYA.split(", "), "", rng)
    assert kept["protected"] == 200 and kept["plain"] < 60
    old = config.resume_fingerprint()
    old["mixed_captions"] = {k: v for k, v in old["mixed_captions"].items() if k != "protect_concepts"}
    assert changed_settings(old, config.model_copy(update={"mixed_captions": config.mixed_captions.model_copy(
        update={"protect_concepts": False})}).resume_fingerprint()) == [], "a run from before the setting resumes"
