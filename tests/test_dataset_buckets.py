"""kohya bucketing (checked against a brute-force reading of the rule and hand-worked cases) and
near-duplicate detection."""

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from studio.dataset import (
    BucketConfig,
    Bucketer,
    Dataset,
    find_near_duplicates,
    group_near_duplicates,
    hamming,
    make_bucket_resolutions,
    phash,
)
from studio.dataset.dedupe import dhash


def brute_force_buckets(area, low, high, step):
    """For each width on the step grid, the tallest grid height whose area fits; plus the square."""
    sides = range(low, high + 1, step)
    buckets = set()
    for w in sides:
        fitting = [h for h in sides if w * h <= area]
        if fitting:
            buckets |= {(w, max(fitting)), (max(fitting), w)}
    square = max(s for s in range(step, high + 1, step) if s * s <= area)
    return sorted(buckets | {(square, square)})


@pytest.mark.parametrize("reso, low, high, step", [(1024, 256, 2048, 64), (1024, 256, 1024, 64),
                                                   (768, 320, 1536, 32), (1152, 512, 2048, 64)])
def test_bucket_resolutions_follow_the_rule(reso, low, high, step):
    got = make_bucket_resolutions((reso, reso), low, high, step)
    assert got == brute_force_buckets(reso * reso, low, high, step)
    assert all(w % step == 0 and h % step == 0 and w * h <= reso * reso for w, h in got)


def test_known_bucket_sets():
    sdxl = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    for size in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1536)]:
        assert size in sdxl
    assert (832, 1216) not in make_bucket_resolutions((1024, 1024), 256, 1024, 64)  # over max reso


@pytest.mark.parametrize("size, bucket, resized, crop", [
    ((832, 1216), (832, 1216), (832, 1216), (0, 0)),  # an exact bucket size keeps its bucket
    ((1664, 2432), (832, 1216), (832, 1216), (0, 0)),  # same aspect, twice as large
    ((1000, 1000), (1024, 1024), (1024, 1024), (0, 0)),  # square: upscaled to the square bucket
    ((1920, 1080), (1344, 768), (1365, 768), (10, 0)),  # 16:9 -> 1.75 is closest; height matched
    ((1080, 1920), (768, 1344), (768, 1365), (0, 10)),
])
def test_bucket_assignment(size, bucket, resized, crop):
    got = Bucketer(BucketConfig(resolution=1024)).select(*size)
    assert (got.bucket, got.resized, got.crop) == (bucket, resized, crop)
    assert got.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_assignment_is_the_closest_aspect_ratio_first_on_ties():
    bucketer = Bucketer(BucketConfig(resolution=1024))
    resos = bucketer.resolutions
    for width, height in [(300, 1000), (1000, 301), (777, 555), (1234, 987), (640, 641), (3000, 200)]:
        errors = [abs(w / h - width / height) for w, h in resos]
        assert bucketer.select(width, height).bucket == resos[errors.index(min(errors))]
        got = bucketer.select(width, height)
        assert got.resized[0] >= got.bucket[0] and got.resized[1] >= got.bucket[1]  # covers the bucket


def test_no_upscale_mode():
    bucketer = Bucketer(BucketConfig(resolution=1024, no_upscale=True))
    small = bucketer.select(500, 300)
    assert (small.bucket, small.resized, small.crop) == ((448, 256), (500, 300), (26, 22))
    assert bucketer.select(2048, 2048).bucket == (1024, 1024)
    with pytest.raises(ValueError, match="bucket step"):
        bucketer.select(30, 500)


def test_config_is_validated():
    with pytest.raises(ValidationError, match="multiple of bucket_reso_steps"):
        BucketConfig(min_bucket_reso=250)
    with pytest.raises(ValidationError, match="below the resolution"):
        BucketConfig(resolution=1024, max_bucket_reso=768)
    with pytest.raises(ValidationError, match="extra"):
        BucketConfig(bogus=1)
    assert BucketConfig(resolution=(1024, 768)).max_reso == (1024, 768)


def test_dataset_bucket_preview_counts_images_and_repeats(tmp_path):
    for folder, sizes in {"2_a": [(832, 1216), (1000, 1000)], "5_b": [(1024, 1024), (40, 300)]}.items():
        (tmp_path / folder).mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", size).save(tmp_path / folder / f"{i}.png")
    preview = Dataset.open(tmp_path).bucket_preview(BucketConfig(resolution=1024))
    assert preview.images == {(256, 2048): 1, (832, 1216): 1, (1024, 1024): 2}
    assert preview.samples == {(256, 2048): 5, (832, 1216): 2, (1024, 1024): 7}
    assert preview.assignments["2_a/0.png"].bucket == (832, 1216)
    assert preview.table()[1] == ("832x1216", 1, 2)
    no_up = Dataset.open(tmp_path).bucket_preview(BucketConfig(resolution=1024, no_upscale=True))
    assert [rel for rel, _ in no_up.unbucketable] == ["5_b/1.png"]


# -- near duplicates -------------------------------------------------------------------------


def picture(seed, size=256):
    """A picture with shapes on a gradient: structure like an illustration, unlike noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    base = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 90)], -1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, size - 40, 2)
        w, h = rng.integers(20, 120, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
    return image


def test_a_resized_recompressed_copy_is_a_near_duplicate_and_another_picture_is_not(tmp_path):
    original = picture(1)
    original.save(tmp_path / "original.png")
    original.resize((150, 150), Image.Resampling.BILINEAR).save(tmp_path / "copy.jpg", quality=60)
    picture(2).save(tmp_path / "other.png")
    picture(3).save(tmp_path / "third.png")

    for method in ("phash", "dhash"):
        groups, problems = find_near_duplicates(
            [tmp_path / n for n in ("original.png", "other.png", "copy.jpg", "third.png")], method=method)
        assert [[p.name for p in g] for g in groups] == [["original.png", "copy.jpg"]], method
        assert problems == []


def test_dataset_near_duplicates(tmp_path):
    picture(1).save(tmp_path / "a.png")
    picture(1).resize((128, 128)).save(tmp_path / "b.webp", quality=70)
    picture(5).save(tmp_path / "c.png")
    groups, problems = Dataset.open(tmp_path).near_duplicates()
    assert [[item.rel for item in group] for group in groups] == [["a.png", "b.webp"]] and problems == []


def test_hash_distances():
    a, b = picture(1), picture(2)
    assert hamming(phash(a), phash(a.resize((200, 200)))) <= 4
    assert hamming(phash(a), phash(b)) > 12
    assert hamming(dhash(a), dhash(b)) > 12
    assert phash(a).bit_count() == 32  # split at the median: half the 64 coefficients above it


def test_grouping_is_transitive_and_leaves_singletons_out():
    hashes = [0b0, 0b111, 0b111111, 0xFFFF << 48, 0b1111111111 << 20]
    assert group_near_duplicates(hashes, max_distance=3) == [[0, 1, 2]]
    assert group_near_duplicates(hashes, max_distance=0) == []


def test_unreadable_files_are_reported_not_fatal(tmp_path):
    (tmp_path / "bad.png").write_text("x")
    picture(1).save(tmp_path / "good.png")
    groups, problems = find_near_duplicates([tmp_path / "bad.png", tmp_path / "good.png"])
    assert groups == [] and [p.kind for p in problems] == ["unhashable"]
