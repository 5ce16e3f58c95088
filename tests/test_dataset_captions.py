"""Caption files: reading with encoding fallbacks, atomic writes, bulk edits, and undo that
restores the exact bytes (including deleting files an edit created), across restarts."""

import re

import pytest
from PIL import Image

from studio.dataset import Dataset
from studio.dataset.captions import decode_caption, split_tags
from studio.dataset.tags import add_tags, regex_replace_tags, replace_tag
from studio.errors import DatasetError

CAPTIONS = {
    "a.txt": b"1girl,solo ,  smile\n",  # odd spacing and a trailing newline: kept byte for byte
    "b.txt": "1girl, café, long hair".encode("cp1252"),  # not UTF-8
    "c.txt": b"\xef\xbb\xbf1boy, solo",  # UTF-8 with a byte-order mark
    "a_nl.txt": b"A girl smiles.",
}


@pytest.fixture
def dataset(tmp_path):
    for stem in "abcd":  # d has no caption at all
        Image.new("RGB", (8, 8)).save(tmp_path / f"{stem}.png")
    for name, data in CAPTIONS.items():
        (tmp_path / name).write_bytes(data)
    return Dataset.open(tmp_path)


def caption_files(root):
    """Every caption file's bytes, by name: the state undo must restore exactly."""
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.txt"))}


def visible_files(root):
    return sorted(p.name for p in root.iterdir() if p.name != ".studio")


def test_reading(dataset):
    assert dataset.read_tags("a.png") == ["1girl", "solo", "smile"]
    assert dataset.read_tags("b.png") == ["1girl", "café", "long hair"]
    assert dataset.read_tags("c.png") == ["1boy", "solo"]
    assert dataset.read_tags("d.png") == []
    assert dataset.read_nl("a.png") == "A girl smiles." and dataset.read_nl("b.png") == ""


def test_decode_fallbacks():
    assert decode_caption("青い髪の少女が立っている。".encode("cp932")) == ("青い髪の少女が立っている。", "cp932")
    assert decode_caption("pokémon, naïve".encode("cp1252")) == ("pokémon, naïve", "cp1252")
    assert decode_caption(b"\x81\x8d") == ("\x81\x8d", "latin-1")
    assert decode_caption("1girl".encode("utf-16")) == ("1girl", "utf-16")
    assert split_tags(" a ,b,,\nc ") == ["a", "b", "c"]


def test_write_tags_is_atomic_and_leaves_no_temp_file(dataset):
    item = dataset.write_tags("d.png", ["1girl", " red eyes "])
    assert item.has_tags
    assert item.tags_path.read_bytes() == b"1girl, red eyes"
    assert visible_files(dataset.root) == ["a.png", "a.txt", "a_nl.txt", "b.png", "b.txt", "c.png", "c.txt",
                                           "d.png", "d.txt"]


def test_a_crash_while_writing_keeps_the_old_caption(dataset, monkeypatch):
    import studio.fileio

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(studio.fileio.os, "replace", crash)
    before = caption_files(dataset.root)
    with pytest.raises(OSError, match="disk full"):
        dataset.write_tags("a.png", ["new"])
    assert caption_files(dataset.root) == before
    assert visible_files(dataset.root) == sorted(["a.png", "b.png", "c.png", "d.png", *CAPTIONS])


def test_an_edit_that_crashes_halfway_is_undone_exactly(dataset, monkeypatch):
    import studio.dataset.dataset as module

    real_write = module.atomic_write_bytes
    calls = []

    def write_once_then_crash(path, data):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("power cut")
        return real_write(path, data)

    before = caption_files(dataset.root)
    monkeypatch.setattr(module, "atomic_write_bytes", write_once_then_crash)
    with pytest.raises(OSError):
        dataset.add_tags(["a.png", "b.png", "c.png"], ["masterpiece"])
    assert caption_files(dataset.root) != before  # the first file was written
    monkeypatch.undo()
    Dataset(dataset.root).undo_last()  # after a restart
    assert caption_files(dataset.root) == before


def test_write_refuses_a_tag_with_a_comma_and_empty_tags_remove_the_file(dataset):
    with pytest.raises(DatasetError, match="comma"):
        dataset.write_tags("a.png", ["blue, hair"])
    dataset.write_tags("a.png", ["  "])
    assert not (dataset.root / "a.txt").exists() and not dataset.item("a.png").has_tags
    dataset.write_nl("a.png", "  ")
    assert not dataset.item("a.png").has_nl


BULK_EDITS = {
    "add_front": lambda ds: ds.add_tags(ds.items, ["masterpiece", "solo"], position="front"),
    "add_back": lambda ds: ds.add_tags(["a.png", "d.png"], ["extra"], position="back"),
    "remove": lambda ds: ds.remove_tags(ds.items, ["solo", "café"]),
    "replace": lambda ds: ds.replace_tag(ds.items, "solo", "1other"),
    "rename": lambda ds: ds.rename_tag("1girl", "girl"),
    "regex_tags": lambda ds: ds.regex_replace(ds.items, r"^(\w+) hair$", r"\1_hair"),
    "regex_nl": lambda ds: ds.regex_replace(ds.items, "smiles", "laughs", target="nl"),
    "write_tags": lambda ds: ds.write_tags("b.png", ["other"]),
    "write_nl": lambda ds: ds.write_nl("d.png", "New caption."),
}


@pytest.mark.parametrize("edit", BULK_EDITS.values(), ids=BULK_EDITS.keys())
def test_undo_restores_the_exact_bytes(dataset, edit):
    before = caption_files(dataset.root)
    result = edit(dataset)
    assert result is not None
    assert caption_files(dataset.root) != before  # the edit did something
    undone = dataset.undo_last()
    assert undone is not None and undone.edited_since == ()
    assert caption_files(dataset.root) == before
    assert [i.has_tags for i in dataset.items] == [True, True, True, False]
    assert dataset.undo_last() is None


def test_undo_survives_a_restart_and_goes_back_in_order(dataset):
    before = caption_files(dataset.root)
    dataset.add_tags(dataset.items, ["one"])
    middle = caption_files(dataset.root)
    dataset.remove_tags(dataset.items, ["solo"])
    reopened = Dataset.open(dataset.root)
    assert [e.op for e in reopened.history()] == ["add_tags", "remove_tags"]
    reopened.undo_last()
    assert caption_files(dataset.root) == middle
    reopened.undo_last()
    assert caption_files(dataset.root) == before
    assert not (dataset.root / "d.txt").exists()  # created by the edit, deleted by its undo


def test_undo_reports_files_edited_since(dataset):
    dataset.add_tags(["a.png"], ["x"])
    (dataset.root / "a.txt").write_text("changed by another program")
    result = dataset.undo_last()
    assert result.edited_since == ("a.txt",)
    assert (dataset.root / "a.txt").read_bytes() == CAPTIONS["a.txt"]


def test_bulk_edits_touch_only_what_changes(dataset):
    result = dataset.add_tags(dataset.items, ["solo"], position="front")
    assert result.changed == ("b.png", "d.png")  # a and c already had it
    assert dataset.read_tags("b.png") == ["solo", "1girl", "café", "long hair"]
    assert (dataset.root / "a.txt").read_bytes() == CAPTIONS["a.txt"]
    assert dataset.remove_tags(["d.png"], ["nothing"]).undo_id is None


def test_edit_results(dataset):
    assert dataset.add_tags(["a.png"], "x, y", position="back").changed == ("a.png",)
    assert dataset.read_tags("a.png") == ["1girl", "solo", "smile", "x", "y"]
    dataset.replace_tag(["a.png"], "x", "smile")  # already there: merged, not duplicated
    assert dataset.read_tags("a.png") == ["1girl", "solo", "smile", "y"]
    dataset.rename_tag("solo", "")
    assert dataset.read_tags("a.png") == ["1girl", "smile", "y"] and dataset.read_tags("c.png") == ["1boy"]
    dataset.regex_replace(["b.png"], r"\s+", "_")
    assert dataset.read_tags("b.png") == ["1girl", "café", "long_hair"]
    assert (dataset.root / "b.txt").read_bytes() == "1girl, café, long_hair".encode()  # now UTF-8
    with pytest.raises(DatasetError, match="invalid regular expression"):
        dataset.regex_replace(["a.png"], "(", "x")
    with pytest.raises(DatasetError, match="invalid regular expression"):
        dataset.regex_replace(["a.png"], "smile", r"\2")  # no group 2: fails on the first match
    with pytest.raises(DatasetError, match="no tag"):
        dataset.add_tags(["a.png"], [" "])
    with pytest.raises(DatasetError, match="not in the dataset"):
        dataset.read_tags("zzz.png")


def test_a_backtracking_regex_is_stopped_and_changes_nothing(dataset, monkeypatch):
    import studio.dataset.dataset as module

    monkeypatch.setattr(module, "REGEX_SECONDS", 0.5)
    (dataset.root / "a.txt").write_text("a" * 60 + "b")
    dataset.scan()
    before = {p.name: p.read_bytes() for p in dataset.root.glob("*.txt")}
    with pytest.raises(DatasetError, match=r"took more than 0 s .*nothing was changed"):
        dataset.regex_replace(dataset.items, r"(a|aa)+$", "x")
    assert {p.name: p.read_bytes() for p in dataset.root.glob("*.txt")} == before
    assert dataset.regex_replace(dataset.items, r"(a+)b$", "x").changed == ("a.png",), "the next edit works"


def test_tag_operations():
    assert add_tags(["a", "b"], ["c", "a", "c"], "front") == ["c", "a", "b"]
    assert add_tags(["a"], ["b"], "back") == ["a", "b"]
    assert replace_tag(["a", "b", "a"], "c", "x") == ["a", "b", "a"]  # untouched when absent
    assert replace_tag(["a", "b", "c"], "a", "c") == ["c", "b"]
    assert regex_replace_tags(["a b", "c"], re.compile(" "), ", ") == ["a", "b", "c"]
    assert regex_replace_tags(["keep"], re.compile("^keep$"), "") == []


def test_tag_frequency_and_filters(dataset):
    assert dataset.tag_frequency() == [
        ("1girl", 2), ("solo", 2), ("1boy", 1), ("café", 1), ("long hair", 1), ("smile", 1)]
    assert [i.rel for i in dataset.filter(all_of=["1girl", "solo"])] == ["a.png"]
    assert [i.rel for i in dataset.filter(any_of=["1boy", "smile"])] == ["a.png", "c.png"]
    assert [i.rel for i in dataset.filter(none_of=["solo"])] == ["b.png", "d.png"]
    assert [i.rel for i in dataset.filter(all_of=["1girl"], none_of=["smile"])] == ["b.png"]


def test_history_is_pruned(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    dataset = Dataset(tmp_path, max_undo=3)
    for i in range(5):
        dataset.write_tags("a.png", [f"t{i}"])
    assert [e.id for e in dataset.history()] == [3, 4, 5]
    assert len(list((tmp_path / ".studio" / "undo").glob("*.json"))) == 3


def test_a_tampered_snapshot_cannot_write_outside(dataset):
    dataset.add_tags(["a.png"], ["x"])
    snapshot = next((dataset.root / ".studio" / "undo").glob("*.json"))
    snapshot.write_text(snapshot.read_text().replace('"a.txt"', '"../evil.txt"'))
    with pytest.raises(DatasetError, match="outside the dataset"):
        dataset.undo_last()
    assert not (dataset.root.parent / "evil.txt").exists()
