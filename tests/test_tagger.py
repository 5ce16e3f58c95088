"""WD tagger pipeline: preprocessing, post-processing, batching, broken images, the demo tagger,
and model resolution offline. CPU only, a few seconds."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from studio.captioning.demo_tagger import DEMO_TAGS, build_demo_tagger_model, ensure_demo_tagger
from studio.captioning.tagger import (
    InputSpec,
    TagError,
    Tagger,
    TagResult,
    TagTable,
    TagThresholds,
    default_providers,
    mcut_threshold,
    postprocess,
    postprocess_batch,
    preprocess,
    resolve_tagger,
)
from studio.errors import ConfigError, ModelNotFoundError, StudioError

rng = np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------
# Preprocessing, checked against a plain numpy computation
# ---------------------------------------------------------------------------------------------
def expected_input(rgb: np.ndarray, alpha: np.ndarray | None, size: int) -> np.ndarray:
    """Blend onto white in float, place on a white square canvas by index arithmetic, bicubic
    resize, swap channels by explicit indexing."""
    h, w, _ = rgb.shape
    colour = rgb.astype(np.float64)
    if alpha is not None:
        a = alpha.astype(np.float64)[:, :, None] / 255.0
        colour = colour * a + 255.0 * (1.0 - a)
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = np.rint(colour).astype(np.uint8)
    if side != size:
        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC))
    bgr = np.stack([canvas[:, :, 2], canvas[:, :, 1], canvas[:, :, 0]], axis=-1)
    return bgr.astype(np.float32)


def random_rgb(h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_alpha(h: int, w: int) -> np.ndarray:
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[: h // 3] = 0  # fully transparent rows
    alpha[-(h // 3):] = 255  # fully opaque rows
    return alpha


@pytest.mark.parametrize("size", [32, 48])  # 48: no resize, so compositing is checked exactly
def test_preprocess_rgba_composites_onto_white(size):
    rgb, alpha = random_rgb(48, 40), random_alpha(48, 40)
    image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    got = preprocess(image, size)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected_input(rgb, alpha, size), atol=1 if size == 48 else 2)


def test_preprocess_la_composites_onto_white():
    grey, alpha = rng.integers(0, 256, (30, 30), dtype=np.uint8), random_alpha(30, 30)
    image = Image.fromarray(np.dstack([grey, alpha]), "LA")
    expected = expected_input(np.repeat(grey[:, :, None], 3, axis=2), alpha, 30)
    np.testing.assert_allclose(preprocess(image, 30), expected, atol=1)


def test_preprocess_palette_with_transparency():
    indices = rng.integers(0, 4, (20, 36), dtype=np.uint8)
    palette = [(10, 20, 30), (200, 0, 0), (0, 150, 0), (0, 0, 250)]
    image = Image.fromarray(indices, "P")
    image.putpalette([c for colour in palette for c in colour] + [0, 0, 0] * 252)
    image.info["transparency"] = 0  # index 0 is see-through
    rgb = np.array(palette, dtype=np.uint8)[indices]
    alpha = np.where(indices == 0, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(preprocess(image, 36), expected_input(rgb, alpha, 36), atol=1)


@pytest.mark.parametrize("shape", [(20, 64), (64, 20)], ids=["wide", "tall"])
def test_preprocess_pads_to_a_centred_white_square(shape):
    rgb = random_rgb(*shape)
    got = preprocess(Image.fromarray(rgb, "RGB"), 64)
    np.testing.assert_array_equal(got, expected_input(rgb, None, 64))
    assert (got[0, 0] == 255).all() and (got[-1, -1] == 255).all()  # padding, not content


def test_preprocess_is_bgr_and_resized_bicubic():
    rgb = random_rgb(90, 120)
    got = preprocess(Image.fromarray(rgb, "RGB"), 48)
    np.testing.assert_array_equal(got, expected_input(rgb, None, 48))
    red = preprocess(Image.new("RGB", (8, 8), (255, 0, 0)), 8)
    assert red[4, 4].tolist() == [0.0, 0.0, 255.0]


def test_preprocess_sixteen_bit_grey_is_scaled_not_clipped():
    image = Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    assert preprocess(image, 8)[0, 0].tolist() == [117.0, 117.0, 117.0]  # 30000 / 257


# ---------------------------------------------------------------------------------------------
# Post-processing on fixture probability vectors
# ---------------------------------------------------------------------------------------------
FIXTURE_TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("1girl", 0), ("long_hair", 0), ("^_^", 0), ("star_(symbol)", 0), ("smile", 0), ("solo", 0),
    ("hatsune_miku", 4), ("hakurei_reimu", 4), ("some_artist", 1),
]


@pytest.fixture(scope="module")
def table():
    return TagTable([n for n, _ in FIXTURE_TAGS], [c for _, c in FIXTURE_TAGS])


def probs_of(**values) -> np.ndarray:
    names = [n for n, _ in FIXTURE_TAGS]
    probs = np.zeros(len(names), dtype=np.float32)
    for name, value in values.items():
        probs[names.index(name.replace("kaomoji", "^_^").replace("star", "star_(symbol)"))] = value
    return probs


def test_default_thresholds_rating_and_order(table):
    probs = probs_of(general=0.2, sensitive=0.7, questionable=0.1, explicit=0.01,
                     **{"1girl": 0.99}, long_hair=0.5, kaomoji=0.36, star=0.35, smile=0.34, solo=0.8,
                     hatsune_miku=0.9, hakurei_reimu=0.84, some_artist=0.99)
    result = postprocess(probs, table)
    assert result.rating == ("sensitive", pytest.approx(0.7))
    assert [t for t, _ in result.characters] == ["hatsune miku"]  # 0.84 < 0.85
    # 0.35 is not above the 0.35 threshold; the artist category is not a general tag
    assert [t for t, _ in result.general] == ["1girl", "solo", "long hair", "^_^"]
    assert [p for _, p in result.general] == sorted((p for _, p in result.general), reverse=True)
    assert result.tags == ["hatsune miku", "1girl", "solo", "long hair", "^_^"]


def test_custom_thresholds(table):
    probs = probs_of(general=0.9, **{"1girl": 0.99}, long_hair=0.5, solo=0.2, hatsune_miku=0.6)
    result = postprocess(probs, table, TagThresholds(general=0.6, character=0.5))
    assert [t for t, _ in result.general] == ["1girl"]
    assert [t for t, _ in result.characters] == ["hatsune miku"]


def test_mcut_threshold_is_the_midpoint_of_the_largest_gap():
    assert mcut_threshold(np.array([0.1, 0.9, 0.8, 0.2])) == pytest.approx(0.5)
    rows = mcut_threshold(np.array([[0.1, 0.9, 0.8, 0.2], [0.95, 0.9, 0.6, 0.5]]))
    np.testing.assert_allclose(rows, [0.5, 0.75])


def test_general_mcut_replaces_the_fixed_threshold(table):
    probs = probs_of(**{"1girl": 0.95}, long_hair=0.9, kaomoji=0.6, star=0.5, smile=0.45, solo=0.4)
    fixed = postprocess(probs, table)
    cut = postprocess(probs, table, TagThresholds(general_mcut=True))
    assert len(fixed.general) == 6
    assert [t for t, _ in cut.general] == ["1girl", "long hair"]  # cut at (0.9 + 0.6) / 2


def test_character_mcut_has_a_floor(table):
    mcut = TagThresholds(character_mcut=True)
    above = postprocess(probs_of(hatsune_miku=0.6, hakurei_reimu=0.1), table, mcut)
    assert [t for t, _ in above.characters] == ["hatsune miku"]  # mcut 0.35, fixed would be 0.85
    low = postprocess(probs_of(hatsune_miku=0.12, hakurei_reimu=0.02), table, mcut)
    assert low.characters == []  # mcut 0.07 is raised to the 0.15 floor


def test_names_keep_kaomoji_and_replace_underscores(table):
    result = postprocess(probs_of(long_hair=0.9, kaomoji=0.8, star=0.7, hatsune_miku=0.9), table)
    assert [t for t, _ in result.general] == ["long hair", "^_^", "star (symbol)"]
    assert result.characters[0][0] == "hatsune miku"


@pytest.mark.parametrize("exclude", [{"long_hair", "^_^"}, {"long hair", " ^_^ "}])
def test_exclusions_in_raw_or_caption_form(table, exclude):
    probs = probs_of(**{"1girl": 0.9}, long_hair=0.8, kaomoji=0.7, hatsune_miku=0.9)
    for mcut in (False, True):
        result = postprocess(probs, table, TagThresholds(exclude=frozenset(exclude), general_mcut=mcut))
        assert [t for t, _ in result.general] == ["1girl"]


def test_batch_postprocess_equals_one_at_a_time(table):
    probs = rng.random((5, len(FIXTURE_TAGS)), dtype=np.float32)
    probs[2] = 0.0  # an image with no tags at all
    for thresholds in (TagThresholds(), TagThresholds(general_mcut=True, character_mcut=True)):
        one_at_a_time = [postprocess(p, table, thresholds) for p in probs]
        assert postprocess_batch(probs, table, thresholds) == one_at_a_time
    assert postprocess_batch(probs, table)[2].general == []


def test_postprocess_rejects_bad_shapes_and_thresholds(table):
    with pytest.raises(ValueError, match="shape"):
        postprocess(np.zeros(len(FIXTURE_TAGS) + 1), table)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        TagThresholds(general=1.5)


# ---------------------------------------------------------------------------------------------
# The demo tagger and the Tagger pipeline
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tagger-models")


@pytest.fixture(scope="module")
def tagger(models_dir):
    return Tagger.load(resolve_tagger("demo-tagger", models_dir))


def cartoon(seed: int, size=(120, 160)) -> Image.Image:
    """A flat background with a few coloured shapes, like a simple illustration."""
    r = np.random.default_rng(seed)
    h, w = size
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[:] = r.integers(120, 256, 3)
    for _ in range(4):
        top, left = r.integers(0, h - 20), r.integers(0, w - 20)
        pixels[top:top + r.integers(10, h // 2), left:left + r.integers(10, w // 2)] = r.integers(0, 256, 3)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(7):
        image = cartoon(i, size=(100 + 20 * i, 140))
        if i == 3:
            image = image.convert("RGBA")
        path = folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(path)
    return paths


def test_demo_tagger_reads_its_input_size_from_the_model(tagger, models_dir):
    assert tagger.input.size == 64 and tagger.input.layout == "NHWC" and tagger.input.max_batch is None
    assert len(tagger.table) == len(DEMO_TAGS)
    assert tagger.size_bytes == (models_dir / "demo-tagger" / "model.onnx").stat().st_size > 0
    assert tagger.providers == ["CPUExecutionProvider"]


def test_demo_tagger_gives_different_tags_to_different_images(tagger):
    images = [cartoon(10), cartoon(11), Image.new("RGB", (64, 64), (20, 40, 200)),
              Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]
    results = [result for _, result in tagger.tag_images(images, batch_size=4)]
    assert all(isinstance(r, TagResult) and r.general for r in results)  # never an empty caption
    assert len({tuple(r.tags) for r in results}) == len(images)
    assert all(r.rating[0] in ("general", "sensitive", "questionable", "explicit") for r in results)


def test_batched_results_equal_unbatched(tagger, image_files):
    one_by_one = list(tagger.tag_images(image_files, batch_size=1))
    batched = list(tagger.tag_images(image_files, batch_size=3))
    assert [i for i, _ in batched] == list(range(len(image_files)))
    for (_, single), (_, batch) in zip(one_by_one, batched):
        assert single.tags == batch.tags and single.rating[0] == batch.rating[0]
        np.testing.assert_allclose([p for _, p in single.general], [p for _, p in batch.general], atol=1e-5)


def test_a_broken_image_is_reported_and_the_rest_tagged(tagger, image_files, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_files[1].read_bytes()[:200])
    items = [image_files[0], junk, image_files[2], truncated, tmp_path / "missing.jpg", image_files[4]]
    progress = []
    tagged = tagger.tag_images(items, batch_size=4, on_progress=lambda *done_of: progress.append(done_of))
    results = dict(tagged)
    assert sorted(results) == list(range(len(items)))
    errors = {i: r for i, r in results.items() if isinstance(r, TagError)}
    assert sorted(errors) == [1, 3, 4]
    assert errors[1].source == str(junk) and "identify" in errors[1].reason
    assert "truncated" in errors[3].reason.lower() or "error" in errors[3].reason.lower()
    assert "No such file" in errors[4].reason
    expected = dict(tagger.tag_images([image_files[0], image_files[2], image_files[4]], batch_size=1))
    assert [results[i].tags for i in (0, 2, 5)] == [expected[i].tags for i in range(3)]
    assert progress == [(4, 6), (6, 6)]


def test_stop_is_checked_between_batches(tagger, image_files):
    stop = threading.Event()
    seen = []
    for index, _ in tagger.tag_images(image_files, batch_size=2, stop=stop):
        seen.append(index)
        stop.set()
    assert seen == [0, 1]


def test_bad_batch_size_fails_at_the_call(tagger, image_files):
    with pytest.raises(ConfigError, match="batch size"):
        tagger.tag_images(image_files, batch_size=0)  # not only once iterated


@pytest.mark.parametrize("shape, expected", [
    (["batch", 448, 448, 3], ("NHWC", 448, None)),
    ([None, 3, 224, 224], ("NCHW", 224, None)),
    ([1, 64, 64, 3], ("NHWC", 64, 1)),
])
def test_input_spec_is_read_from_the_model(shape, expected):
    node = SimpleNamespace(name="input", shape=shape, type="tensor(float)")
    spec = InputSpec.read(node)
    assert (spec.layout, spec.size, spec.max_batch) == expected


def test_input_spec_rejects_non_image_inputs():
    with pytest.raises(ModelNotFoundError, match="input shape"):
        InputSpec.read(SimpleNamespace(name="x", shape=["batch", "h", "w", 3], type="tensor(float)"))


def test_unload_and_reload(models_dir):
    tagger = Tagger.load(models_dir / "demo-tagger")
    tagger.unload()
    assert not tagger.is_loaded
    with pytest.raises(StudioError, match="unloaded"):
        tagger.predict(np.zeros((1, 64, 64, 3), np.float32))
    tagger.reload()
    assert tagger.predict(np.zeros((2, 64, 64, 3), np.float32)).shape == (2, len(DEMO_TAGS))


def test_demo_tagger_is_built_once_and_rebuilt_when_half_written(tmp_path):
    folder = ensure_demo_tagger(tmp_path)
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    assert ensure_demo_tagger(tmp_path) == folder
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp  # not rewritten
    assert build_demo_tagger_model().SerializeToString() == (folder / "model.onnx").read_bytes()  # fixed seed

    (folder / ".demo-complete.json").unlink()  # as if the build had crashed before the marker
    (folder / "model.onnx").write_bytes(b"half a model")
    ensure_demo_tagger(tmp_path)
    assert (folder / ".demo-complete.json").is_file()
    assert Tagger.load(folder).predict(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, len(DEMO_TAGS))
    assert [p.name for p in tmp_path.iterdir()] == ["demo-tagger"]  # no temporary folder left


# ---------------------------------------------------------------------------------------------
# Resolution and loading errors
# ---------------------------------------------------------------------------------------------
def test_offline_uncached_real_tagger_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_tagger("wd-vit-tagger-v3", tmp_path)
    message = str(caught.value)
    assert "offline" in message and "model.onnx" in message and "selected_tags.csv" in message
    assert str(tmp_path / "wd-vit-tagger-v3") in message and "--demo" in message


def test_a_known_tagger_placed_by_hand_is_used_without_the_hub(tmp_path, models_dir):
    by_hand = tmp_path / "wd-swinv2-tagger-v3"
    by_hand.mkdir()
    for name in ("model.onnx", "selected_tags.csv"):
        (by_hand / name).write_bytes((models_dir / "demo-tagger" / name).read_bytes())
    assert resolve_tagger("wd-swinv2-tagger-v3", tmp_path) == by_hand
    assert resolve_tagger(str(by_hand), tmp_path / "elsewhere") == by_hand


def test_bad_references_and_folders(tmp_path, models_dir):
    with pytest.raises(ModelNotFoundError, match="unknown tagger"):
        resolve_tagger("not a tagger", tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="selected_tags.csv"):
        resolve_tagger(str(tmp_path / "half"), tmp_path)


def test_model_and_tag_table_must_match(tmp_path, models_dir):
    (tmp_path / "model.onnx").write_bytes((models_dir / "demo-tagger" / "model.onnx").read_bytes())
    lines = (models_dir / "demo-tagger" / "selected_tags.csv").read_text().splitlines()
    (tmp_path / "selected_tags.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ModelNotFoundError, match="different taggers"):
        Tagger.load(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    (tmp_path / "selected_tags.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ModelNotFoundError, match="not a loadable ONNX model"):
        Tagger.load(tmp_path)


def test_cuda_provider_first_when_available(monkeypatch):
    import onnxruntime

    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: with_cuda)
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]
