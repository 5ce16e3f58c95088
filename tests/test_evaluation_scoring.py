"""Checkpoint scoring on constructed tag sets with known answers: a concept that learned, one that did
not, one that bleeds onto others, a mislabelled image; the recommendation and its bounds."""

import pytest

from studio.evaluation.prompts import CORE, FREE, POSE, TRIGGER, concept_prompts, prompt_set
from studio.evaluation.scoring import (
    Bounds,
    against_base,
    base_scores,
    concept_scores,
    problems,
    verdict,
)

ALICE = {"name": "alice", "triggers": ["alice"], "core_tags": ["blonde hair", "blue eyes", "twintails", "hat"]}
BOB = {"name": "bob", "triggers": ["bob"], "core_tags": ["black hair", "red eyes", "glasses"]}
CAROL = {"name": "carol", "triggers": ["carol \\(game\\)"], "core_tags": ["green hair", "hat"]}
CONCEPTS = [ALICE, BOB, CAROL]
POSE_TAGS = ["standing", "full body"]


def image(concept, kind, tags, expects=()):
    return {"concept": concept, "kind": kind, "tags": list(tags), "expects": list(expects)}


def concept_images(concept, look, *, pose_followed=True, seeds=2):
    """A concept's TRIGGER, CORE and POSE images, each showing `look` (and the pose when followed)."""
    name = concept["name"]
    images = []
    for _ in range(seeds):
        images.append(image(name, TRIGGER, ["1girl", "solo", *look]))
        images.append(image(name, CORE, ["1girl", "solo", *concept["core_tags"]], concept["core_tags"]))
        images.append(image(name, POSE, ["1girl", *look, *(POSE_TAGS if pose_followed else [])], POSE_TAGS))
    return images


def free_images(extra=(), seeds=2):
    return [image(None, FREE, ["1girl", "solo", *extra], ["1girl", "solo"]) for _ in range(seeds)] + \
        [image(None, FREE, ["1boy", "solo", *extra], ["1boy", "solo"]) for _ in range(seeds)]


def base_set():
    """The base model: nobody's look, the poses followed."""
    return [*(i for c in CONCEPTS for i in concept_images(c, [])), *free_images()]


def scored(images, base_images=None):
    base = base_scores(CONCEPTS, base_images if base_images is not None else base_set())
    return against_base(concept_scores(CONCEPTS, images), base), base


def test_a_concept_that_learned_and_one_that_did_not():
    images = [*concept_images(ALICE, ALICE["core_tags"]), *concept_images(BOB, []),
              *concept_images(CAROL, ["green_hair", "Hat"]), *free_images()]
    scores, base = scored(images)
    assert scores["alice"]["fidelity"] == 1.0
    assert scores["carol"]["fidelity"] == 1.0, "tags compare by tag_key: `green_hair`, `Hat`"
    assert scores["bob"]["fidelity"] == 0.0
    assert scores["bob"]["fidelity_with_tags"] == 1.0, "asked for its tags, it draws them"
    assert base["alice"]["fidelity"] == 0.0
    result = verdict([{"file": "lora.safetensors", "step": 10, "scores": scores}], base, Bounds())
    assert result.recommended == "lora.safetensors"
    assert result.not_learned == ["bob"]


def test_a_bleeding_concept_is_caught_against_the_base_model_and_not_recommended():
    clean = [*concept_images(ALICE, ALICE["core_tags"][:2]), *concept_images(BOB, BOB["core_tags"]),
             *concept_images(CAROL, CAROL["core_tags"]), *free_images()]
    # later: alice learned fully, but her hair and eyes now show on bob, on "1girl" and on "1boy" too
    bleeding = [*concept_images(ALICE, ALICE["core_tags"]),
                *concept_images(BOB, [*BOB["core_tags"], "blonde hair", "blue eyes"]),
                *concept_images(CAROL, CAROL["core_tags"]), *free_images(["blonde hair", "blue eyes"])]
    early, base = scored(clean)
    late, _ = scored(bleeding)
    assert early["alice"]["bleed"] == 0.0 and early["alice"]["fidelity"] == 0.5
    # distinctive core tags: vs bob all 4 of alice's; vs carol 3 (carol has a hat too); trigger-less: all 4
    # bob's 4 trigger/pose images 2/4 (his core-tag prompts 0/4), carol's 6 images 0/3, 4 free images 2/4
    assert late["alice"]["bleed"] == pytest.approx((4 * 0.5 + 4 * 0.5) / 16)
    assert late["alice"]["fidelity"] == 1.0 and late["bob"]["bleed"] == 0.0
    checkpoints = [{"file": "a.safetensors", "step": 100, "scores": early},
                   {"file": "b.safetensors", "step": 200, "scores": late}]
    result = verdict(checkpoints, base, Bounds(max_bleed=0.2))
    assert result.recommended == "a.safetensors", "the best fidelity, but bleeding past the bound"
    assert "b.safetensors: alice bleeds 0.25 (over 0.20)" in result.notes
    assert verdict(checkpoints, base, Bounds(max_bleed=0.3)).recommended == "b.safetensors"


def test_what_the_base_model_draws_anyway_is_not_bleed():
    base_images = [*concept_images(ALICE, []), *concept_images(BOB, []), *concept_images(CAROL, []),
                   *free_images(["blonde hair"])]
    images = [*concept_images(ALICE, ALICE["core_tags"]), *concept_images(BOB, []), *concept_images(CAROL, []),
              *free_images(["blonde hair"])]
    scores, base = scored(images, base_images)
    assert scores["alice"]["bleed_raw"] > 0 and base["alice"]["bleed_raw"] == scores["alice"]["bleed_raw"]
    assert scores["alice"]["bleed"] == 0.0 and base["alice"]["bleed"] == 0.0


def test_a_shared_core_tag_is_not_bleed():
    """carol draws her own hat: alice's hat is not what bleeds there."""
    images = [*concept_images(ALICE, []), *concept_images(BOB, []), *concept_images(CAROL, CAROL["core_tags"])]
    scores, _ = scored(images, [])
    assert scores["alice"]["bleed_raw"] == 0.0


def test_a_mislabelled_image_costs_its_share_and_changes_no_verdict():
    images = [*concept_images(ALICE, ALICE["core_tags"], seeds=4), *concept_images(BOB, BOB["core_tags"]),
              *concept_images(CAROL, CAROL["core_tags"]), *free_images(seeds=5)]
    # the tagger got one of alice's 8 trigger/pose images wrong, and put her look on one "1boy" image
    trigger_image = next(i for i in images if i["concept"] == "alice" and i["kind"] == TRIGGER)
    trigger_image["tags"] = ["1boy", "solo", "black hair"]
    free_boy = next(i for i in images if i["kind"] == FREE and "1boy" in i["tags"])
    free_boy["tags"] += ALICE["core_tags"]
    scores, base = scored(images)
    assert scores["alice"]["fidelity"] == pytest.approx(7 / 8)
    assert 0 < scores["alice"]["bleed"] < 0.1
    result = verdict([{"file": "x.safetensors", "step": 5, "scores": scores}], base, Bounds())
    assert result.recommended == "x.safetensors" and result.not_learned == []


def test_flexibility_counts_the_asked_for_tags_and_its_bound_follows_a_weaker_base():
    stiff = [*concept_images(ALICE, ALICE["core_tags"], pose_followed=False), *concept_images(BOB, BOB["core_tags"]),
             *concept_images(CAROL, CAROL["core_tags"]), *free_images()]
    scores, base = scored(stiff)
    assert scores["alice"]["flexibility"] == 0.0 and scores["bob"]["flexibility"] == 1.0
    assert problems(scores, base, Bounds()) == ["alice follows its prompts 0.00 (under 0.50)"]
    # a base model that never shows the pose either: the tagger cannot see it, no checkpoint is blamed
    weak_base = [*(i for c in CONCEPTS for i in concept_images(c, [], pose_followed=False)), *free_images()]
    scores, base = scored(stiff, weak_base)
    assert problems(scores, base, Bounds()) == []


def test_nothing_within_bounds_recommends_nothing_and_says_why():
    bleeding = [*concept_images(ALICE, ALICE["core_tags"]), *concept_images(BOB, ALICE["core_tags"]),
                *concept_images(CAROL, []), *free_images(ALICE["core_tags"])]
    scores, base = scored(bleeding)
    result = verdict([{"file": "only.safetensors", "step": 1, "scores": scores}], base, Bounds())
    assert result.recommended is None
    assert result.notes[0] == "no checkpoint is within the bounds"


def test_ties_go_to_the_earlier_checkpoint_and_pruned_files_are_never_recommended():
    images = [*concept_images(ALICE, ALICE["core_tags"]), *concept_images(BOB, BOB["core_tags"]),
              *concept_images(CAROL, CAROL["core_tags"]), *free_images()]
    scores, base = scored(images)
    checkpoints = [{"file": "late.safetensors", "step": 20, "scores": scores},
                   {"file": "early.safetensors", "step": 10, "scores": scores}]
    assert verdict(checkpoints, base, Bounds()).recommended == "early.safetensors"
    checkpoints[1]["missing"] = True
    assert verdict(checkpoints, base, Bounds()).recommended == "late.safetensors"


def test_a_concept_without_core_tags_is_not_measured_nor_called_unlearned():
    style = {"name": "style", "triggers": [], "core_tags": []}
    images = [image("style", TRIGGER, ["1girl"]), image("style", POSE, ["1girl", "standing"], ["standing"])]
    scores = against_base(concept_scores([style], images), None)
    assert scores["style"]["fidelity"] is None and scores["style"]["bleed"] is None
    assert scores["style"]["flexibility"] == 1.0
    result = verdict([{"file": "s.safetensors", "step": 1, "scores": scores}], None, Bounds())
    assert result.recommended == "s.safetensors" and result.not_learned == []
    assert any("style has no core tags" in note for note in result.notes)


def test_the_prompt_set_names_what_each_prompt_asks_for():
    prompts = concept_prompts("carol", ["carol \\(game\\)"], ["green hair", "hat"])
    assert [p.kind for p in prompts] == [TRIGGER, CORE, POSE, POSE, POSE, POSE]
    assert prompts[0].text == "carol \\(game\\)"
    assert prompts[1].text == "carol \\(game\\), green hair, hat" and prompts[1].expects == ("green hair", "hat")
    assert prompts[2].text.startswith("carol \\(game\\), standing") and "standing" in prompts[2].expects
    no_trigger = concept_prompts("style", [], [])
    assert [p.kind for p in no_trigger] == [TRIGGER, POSE, POSE, POSE, POSE] and no_trigger[0].text == "solo"
    whole = prompt_set([ALICE, BOB])
    assert [p.concept for p in whole[-3:]] == [None, None, None]
    assert {p.text for p in whole[-3:]} >= {"1girl, solo", "1boy, solo"}
