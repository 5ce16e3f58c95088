"""Scanning: layouts, header sizes, and every class of bad file reported with its reason while
all the good images are still returned."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from studio.dataset import Dataset, ScanOptions, scan_dataset, scan_headers
from studio.dataset.model import parse_repeat_folder
from studio.errors import DatasetError


def noise(width, height, seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def encoded(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width, height) -> bytes:
    """A valid-looking PNG whose IHDR declares width x height; the data is a few bytes, so nothing
    large is ever allocated unless someone decodes it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.fixture
def messy(tmp_path):
    """A flat dataset holding good images of every unusual kind and one file of each bad kind."""
    root = tmp_path / "ds"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    good = {
        "rgb.png": encoded(noise(40, 30), "PNG"),
        "photo.jpg": encoded(noise(64, 48, 1), "JPEG", quality=90),
        "cmyk.jpg": encoded(noise(32, 32, 2, "CMYK"), "JPEG"),
        "gray16.png": encoded(Image.fromarray(np.full((8, 8), 40000, np.uint16)), "PNG"),
        "la.png": encoded(noise(16, 16, 3, "LA"), "PNG"),
        "rgba.png": encoded(noise(16, 16, 4, "RGBA"), "PNG"),
        "webp.webp": encoded(noise(20, 10, 5), "WEBP", quality=80),
        "bitmap.bmp": encoded(noise(12, 10, 6), "BMP"),
        "rotated.jpg": encoded(noise(40, 20, 7), "JPEG", exif=exif_with_orientation(6)),
    }
    palette = noise(16, 16, 8).quantize(8)
    good["palette.png"] = encoded(palette, "PNG", transparency=0)
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    good["anim.gif"] = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    for name, data in good.items():
        (root / name).write_bytes(data)

    png = encoded(noise(64, 64, 9), "PNG")
    jpeg = encoded(noise(64, 64, 10), "JPEG", quality=95)
    (root / "empty.png").write_bytes(b"")
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.png").write_text("this is not an image\n")
    (root / "bomb.png").write_bytes(png_declaring(20000, 20000))
    (outside / "elsewhere.png").write_bytes(png)
    os.symlink(outside / "elsewhere.png", root / "escape.png")
    os.symlink("/etc/hosts", root / "hosts.png")

    (root / "photo.txt").write_bytes("café, 1girl".encode("cp1252"))
    (root / "rgb.txt").write_text("1girl, solo")
    (root / "rgb_nl.txt").write_text("A girl standing.")
    (root / "leftover.txt").write_text("1boy")
    return root


EXPECTED_SKIPS = {
    "empty.png": "empty",
    "cut.png": "truncated",
    "cut.jpg": "truncated",
    "text.png": "not_image",
    "bomb.png": "too_large",
    "escape.png": "symlink_outside",
    "hosts.png": "symlink_outside",
}


def test_every_bad_file_is_reported_and_every_good_one_kept(messy):
    report = scan_dataset(messy)

    skipped = {p.path.name: p.kind for p in report.skipped}
    assert skipped == EXPECTED_SKIPS
    assert all(p.reason for p in report.problems)
    kept = {item.rel for item in report.items}
    assert kept == {
        "rgb.png", "photo.jpg", "cmyk.jpg", "gray16.png", "la.png", "rgba.png", "webp.webp",
        "bitmap.bmp", "rotated.jpg", "palette.png", "anim.gif",
    }
    assert report.layout == "flat" and report.subsets[0].repeats == 1


def test_unusual_images_are_kept_with_a_warning_saying_why(messy):
    report = scan_dataset(messy)
    warned = {(p.path.name, p.kind) for p in report.warnings}
    assert {
        ("cmyk.jpg", "mode"),
        ("gray16.png", "mode"),
        ("la.png", "alpha"),
        ("rgba.png", "alpha"),
        ("palette.png", "alpha"),
        ("anim.gif", "animated"),
        ("photo.txt", "caption_encoding"),
        ("leftover.txt", "orphan_caption"),
    } <= warned
    assert ("rgb.png", "mode") not in warned and ("photo.jpg", "mode") not in warned


def test_the_reasons_say_what_happened(messy):
    report = scan_dataset(messy)
    reasons = {p.path.name: p.reason for p in report.skipped}
    reasons["photo.txt"] = next(p.reason for p in report.warnings if p.path.name == "photo.txt")
    assert "0 bytes" in reasons["empty.png"]
    assert "truncated" in reasons["cut.png"] and "truncated" in reasons["cut.jpg"]
    assert "not an image" in reasons["text.png"]
    assert "outside the dataset" in reasons["hosts.png"]
    assert "cp1252" in reasons["photo.txt"]


def test_sizes_come_from_headers_with_exif_orientation(messy):
    items = {item.rel: item for item in scan_dataset(messy).items}
    assert items["rgb.png"].size == (40, 30)
    assert items["webp.webp"].size == (20, 10)
    assert items["rotated.jpg"].size == (20, 40)  # stored 40x20, orientation 6 turns it upright
    assert items["cmyk.jpg"].mode == "CMYK" and items["gray16.png"].mode == "I;16"


def test_captions_are_attached_and_a_cp1252_caption_is_read_not_skipped(messy):
    dataset = Dataset.open(messy)
    rgb = dataset.item("rgb.png")
    assert rgb.has_tags and rgb.has_nl
    assert dataset.read_tags(rgb) == ["1girl", "solo"]
    assert dataset.read_nl(rgb) == "A girl standing."
    assert dataset.read_tags("photo.jpg") == ["café", "1girl"]
    assert not dataset.item("la.png").has_tags


def test_a_declared_size_over_the_limit_is_skipped_without_decoding(tmp_path):
    (tmp_path / "big.png").write_bytes(png_declaring(3000, 3000))
    (tmp_path / "ok.png").write_bytes(png_declaring(100, 100))
    report = scan_dataset(tmp_path, ScanOptions(max_pixels=1_000_000))
    assert [(p.path.name, p.kind) for p in report.skipped] == [("big.png", "too_large")]
    assert "3000x3000" in report.skipped[0].reason


def test_check_levels(tmp_path):
    png = encoded(noise(64, 64), "PNG")
    (tmp_path / "cut.png").write_bytes(png[:-40])
    assert [p.kind for p in scan_dataset(tmp_path, ScanOptions(check="quick")).skipped] == ["truncated"]
    assert [p.kind for p in scan_dataset(tmp_path, ScanOptions(check="full")).skipped] == ["truncated"]
    assert scan_dataset(tmp_path, ScanOptions(check="none")).items[0].rel == "cut.png"


def test_a_jpeg_with_data_after_its_end_marker_is_not_called_truncated(tmp_path):
    (tmp_path / "motion.jpg").write_bytes(encoded(noise(32, 32), "JPEG") + b"\x00ftypmp42" + b"x" * 5000)
    report = scan_dataset(tmp_path)
    assert [item.rel for item in report.items] == ["motion.jpg"] and not report.skipped


def test_kohya_repeat_folders(tmp_path):
    for folder, names in {"10_alice": ["a.png", "b.png"], "3_my_char": ["c.png"], "0_off": ["d.png"],
                          "misc": ["e.png"]}.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(encoded(noise(8, 8), "PNG"))
    (tmp_path / "loose.png").write_bytes(encoded(noise(8, 8), "PNG"))
    (tmp_path / "10_alice" / "deeper").mkdir()
    (tmp_path / ".studio").mkdir()

    report = scan_dataset(tmp_path)

    assert report.layout == "kohya"
    assert [(s.folder, s.name, s.repeats, s.images) for s in report.subsets] == [
        ("3_my_char", "my_char", 3, 1), ("10_alice", "alice", 10, 2)]
    assert {i.rel: i.repeats for i in report.items} == {"10_alice/a.png": 10, "10_alice/b.png": 10,
                                                         "3_my_char/c.png": 3}
    assert report.samples_per_epoch == 23
    problems = {(p.path.name, p.kind) for p in report.problems}
    assert {("loose.png", "loose_image"), ("misc", "ignored_folder"), ("0_off", "ignored_folder"),
            ("deeper", "ignored_folder")} <= problems
    assert not any(p.path.name == ".studio" for p in report.problems)


def test_parse_repeat_folder():
    assert parse_repeat_folder("10_alice") == (10, "alice")
    assert parse_repeat_folder("3_my_char") == (3, "my_char")
    assert parse_repeat_folder("5") == (5, "")
    assert parse_repeat_folder("alice") is None
    assert parse_repeat_folder("x10_alice") is None


def test_images_sharing_a_stem_are_flagged(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(noise(8, 8), "PNG"))
    (tmp_path / "a.jpg").write_bytes(encoded(noise(8, 8), "JPEG"))
    (tmp_path / "a.txt").write_text("")
    problems = {(p.path.name, p.kind) for p in scan_dataset(tmp_path).problems}
    assert ("a.png", "caption_shared") in problems
    assert ("a.txt", "caption_empty") in problems


def test_natural_order_and_progress(tmp_path):
    for i in (10, 2, 1):
        (tmp_path / f"img{i}.png").write_bytes(encoded(noise(8, 8), "PNG"))
    seen = []
    report = scan_dataset(tmp_path, on_progress=lambda done, total: seen.append((done, total)))
    assert [i.rel for i in report.items] == ["img1.png", "img2.png", "img10.png"]
    assert seen[-1] == (3, 3)


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_scan_headers_for_benchmarks(tmp_path):
    paths = []
    for i in range(50):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encoded(noise(16, 12, i), "PNG"))
        paths.append(path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    results = scan_headers([*paths, tmp_path / "bad.png"])
    assert [(header.width, header.height) for _, header, _ in results[:-1]] == [(16, 12)] * 50
    assert results[-1][1] is None and results[-1][2][0].kind == "not_image"


@pytest.mark.slow
def test_header_scan_of_10000_small_pngs_takes_seconds(tmp_path):
    import time

    data = encoded(noise(32, 32), "PNG")
    for i in range(10_000):
        (tmp_path / f"{i:05d}.png").write_bytes(data)
    start = time.perf_counter()
    report = scan_dataset(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(report.items) == 10_000
    assert elapsed < 10, f"scan took {elapsed:.1f} s"


def test_a_huge_caption_is_reported_and_its_image_skipped(tmp_path):
    from PIL import Image

    from studio.dataset.captions import MAX_CAPTION_BYTES, read_caption
    from studio.dataset.scan import scan_dataset
    from studio.errors import DatasetError

    for name in ("ok", "huge"):
        Image.new("RGB", (32, 32), "red").save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text("1girl, solo")
    with open(tmp_path / "huge.txt", "w") as fh:
        fh.write("tag, " * (MAX_CAPTION_BYTES // 2))
    result = scan_dataset(tmp_path)
    assert [item.rel for item in result.items] == ["ok.png"]
    [problem] = [p for p in result.problems if p.kind == "caption_too_large"]
    assert problem.severity == "skip" and problem.path.name == "huge.png" and "160 KB" in problem.reason
    with pytest.raises(DatasetError, match="over the 64 KB limit"):
        read_caption(tmp_path / "huge.txt")
