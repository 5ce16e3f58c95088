"""Imports: zips that try to escape the dataset are refused whole, limits hold, nothing existing
is ever overwritten, and a failed import leaves the dataset as it was."""

import io
import stat
import struct
import zipfile

import pytest
from PIL import Image

from studio.dataset import ImportLimits, import_files, import_uploads, import_zip
from studio.errors import DatasetError, JobStopped


def png(colour=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, "PNG")
    return buf.getvalue()


def make_zip(path, entries):
    """entries: name -> bytes, or a ZipInfo -> bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def tree(path):
    """Every file under path, relative, including hidden ones."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


@pytest.fixture
def places(tmp_path):
    root = tmp_path / "sandbox" / "dataset"
    root.mkdir(parents=True)
    return root, tmp_path / "upload.zip"


def symlink_entry(name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


@pytest.mark.parametrize("evil", ["../evil.txt", "/abs.txt", "C:/drive.txt", "..\\evil.txt",
                                  "10_a/../../evil.txt", "10_a/C:/evil.txt", "sym.png"])
def test_unsafe_entries_refuse_the_whole_archive(places, evil):
    root, archive = places
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.png", png())
        if evil == "sym.png":
            zf.writestr(*symlink_entry("sym.png", "/etc/hosts"))
        else:
            zf.writestr(zipfile.ZipInfo(evil), b"gotcha")
    with pytest.raises(DatasetError, match="unsafe entr.*nothing was extracted"):
        import_zip(root, archive)
    assert tree(root.parent) == []  # nothing in the dataset, nothing beside it


def test_a_good_zip_keeps_its_repeat_folders_and_skips_junk(places):
    root, archive = places
    make_zip(archive, {
        "mydata/10_alice/a.png": png(), "mydata/10_alice/a.txt": b"alice, 1girl",
        "mydata/10_alice/a_nl.txt": b"Alice.", "mydata/2_bob/b.png": png((0, 0, 255)),
        "mydata/__MACOSX/._a.png": b"junk", "mydata/.DS_Store": b"junk", "mydata/notes.json": b"{}",
    })
    report = import_zip(root, archive)
    assert tree(root) == ["10_alice/a.png", "10_alice/a.txt", "10_alice/a_nl.txt", "2_bob/b.png"]
    assert (root / "10_alice" / "a.txt").read_bytes() == b"alice, 1girl"
    assert len(report.imported) == 4 and not report.renamed
    assert sorted(p.path.name for p in report.skipped) == [".DS_Store", "._a.png", "notes.json"]


def test_zip_limits(places):
    root, archive = places
    make_zip(archive, {"a.png": png(), "b.png": png(), "c.png": png()})
    with pytest.raises(DatasetError, match="3 files, over the limit of 2"):
        import_zip(root, archive, limits=ImportLimits(max_files=2))
    with pytest.raises(DatasetError, match="uncompressed, over the limit"):
        import_zip(root, archive, limits=ImportLimits(max_total_bytes=100))
    assert tree(root) == []
    assert len(import_zip(root, archive).imported) == 3


def test_an_entry_larger_than_it_declares_is_refused(places):
    """A forged size (the limits trust declared sizes) must not let more data through."""
    root, archive = places
    payload = b"x" * 500
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.txt", payload)
    data = bytearray(archive.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 10)  # uncompressed size in the local header
    struct.pack_into("<I", data, central + 24, 10)  # and in the central directory
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetError):
        import_zip(root, archive, limits=ImportLimits(max_total_bytes=100))
    assert tree(root) == []


def test_import_never_overwrites_and_renames_images_with_their_captions(places):
    root, archive = places
    (root / "a.png").write_bytes(png())
    (root / "a.txt").write_bytes(b"original")
    (root / "b.txt").write_bytes(b"orphan caption")
    make_zip(archive, {"a.png": png((0, 255, 0)), "a.txt": b"incoming", "b.png": png(), "c.txt": b"c"})

    report = import_zip(root, archive)

    assert (root / "a.png").read_bytes() == png() and (root / "a.txt").read_bytes() == b"original"
    assert (root / "a (1).png").read_bytes() == png((0, 255, 0))
    assert (root / "a (1).txt").read_bytes() == b"incoming"
    # b.png must not adopt the existing orphan b.txt: it moves to a free stem
    assert (root / "b (1).png").exists() and (root / "b.txt").read_bytes() == b"orphan caption"
    assert {(f.source, f.path.name) for f in report.renamed} == {
        ("a.png", "a (1).png"), ("a.txt", "a (1).txt"), ("b.png", "b (1).png")}
    assert "renamed" in report.summary()
    assert not [p for p in tree(root) if p.startswith(".") or p.endswith(".part")]


def test_an_image_never_shares_a_stem_with_an_existing_image(places):
    root, archive = places
    (root / "a.JPG").write_bytes(b"existing")
    make_zip(archive, {"a.png": png()})
    import_zip(root, archive)
    assert tree(root) == ["a (1).png", "a.JPG"]  # a.png would share a.txt with a.JPG


def test_uploads_copy_images_and_captions_and_route_zips(tmp_path):
    root = tmp_path / "ds"
    (root / "5_x").mkdir(parents=True)
    (root / "5_x" / "old.png").write_bytes(png())
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "old.txt").write_bytes(b"caption for the existing image")
    (uploads / "new.PNG").write_bytes(png((1, 2, 3)))
    (uploads / "readme.md").write_bytes(b"no")
    make_zip(uploads / "more.zip", {"z.png": png()})
    make_zip(uploads / "evil.zip", {"../z.png": png()})

    report = import_uploads(root, sorted(uploads.iterdir()), folder="5_x")

    assert tree(root) == ["5_x/new.PNG", "5_x/old.png", "5_x/old.txt", "5_x/z.png"]
    assert (root / "5_x" / "old.txt").read_bytes() == b"caption for the existing image"
    assert [(p.path.name, p.kind) for p in report.skipped] == [("readme.md", "unsupported"),
                                                               ("evil.zip", "refused")]
    assert "refused evil.zip" in report.summary()


def test_same_name_twice_in_one_upload(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.png").write_bytes(png())
    report = import_files(root, [tmp_path / "one" / "a.png", tmp_path / "two" / "a.png"])
    assert tree(root) == ["a (1).png", "a.png"] and len(report.renamed) == 1


def test_a_failed_import_removes_what_it_placed(places):
    root, archive = places
    (root / "keep.png").write_bytes(png())
    make_zip(archive, {f"{i}.png": png() for i in range(5)})

    def stop_after_two(done, total):
        if done == 2:
            raise JobStopped("stopped")

    with pytest.raises(JobStopped):
        import_zip(root, archive, on_progress=stop_after_two)
    assert tree(root) == ["keep.png"]


def test_bad_destinations_and_archives(places, tmp_path):
    root, archive = places
    with pytest.raises(DatasetError, match="plain subfolder"):
        import_files(root, [], folder="../x")
    archive.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable zip"):
        import_zip(root, archive)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "10_link").symlink_to(outside)
    make_zip(archive, {"10_link/a.png": png()})
    with pytest.raises(DatasetError, match="outside the dataset"):
        import_zip(root, archive)
    assert tree(outside) == []
