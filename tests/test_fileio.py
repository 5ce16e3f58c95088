import pytest

from studio.fileio import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "caption.txt"
    target.write_text("old")
    atomic_write_text(target, "1girl, solo")
    assert target.read_text() == "1girl, solo"
    assert [p.name for p in tmp_path.iterdir()] == ["caption.txt"]


def test_a_crash_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_a_torn_last_line_is_skipped_and_reported(tmp_path, capsys):
    from studio.fileio import read_jsonl

    path = tmp_path / "events.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "step": 2}\n{"kind": "st')
    assert [e["step"] for e in read_jsonl(path)] == [1, 2]
    assert "skipped 1 unreadable line(s) (3)" in capsys.readouterr().err


def test_numbered_names_are_claimed_never_counted(tmp_path):
    import threading

    from studio.fileio import write_new_numbered

    def name(n):
        return f"grid-{n:04d}.png"

    first = write_new_numbered(tmp_path, name, lambda p: p.write_text("a"))
    second = write_new_numbered(tmp_path, name, lambda p: p.write_text("b"))
    first.unlink()  # a deleted grid: the next one must not land on the second
    third = write_new_numbered(tmp_path, name, lambda p: p.write_text("c"), start=1)
    assert second.read_text() == "b" and third.name == "grid-0002.png" and third.read_text() == "c"

    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        write_new_numbered(tmp_path / "many", name, lambda p, i=i: p.write_text(str(i))))) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({p.name for p in results}) == 8
    assert sorted(p.read_text() for p in results) == [str(i) for i in range(8)]
    assert not list(tmp_path.glob("many/.new.*")), "no temporary file is left behind"


def test_leftovers_of_interrupted_saves_are_removed_once_stale(tmp_path):
    import os
    import time

    from studio.fileio import remove_stale_temporaries

    (tmp_path / "runs" / "r" / "state").mkdir(parents=True)
    old_file = tmp_path / "runs" / "r" / ".lora.safetensors.abc.tmp"
    old_dir = tmp_path / "runs" / "r" / ".state.123.tmp"
    fresh = tmp_path / ".new.xyz.tmp"
    keep = tmp_path / "runs" / "r" / "lora.safetensors"
    for path in (old_file, fresh, keep):
        path.write_bytes(b"x")
    old_dir.mkdir()
    (old_dir / "optimizer.safetensors").write_bytes(b"x")
    hour_ago = time.time() - 3600
    for path in (old_file, old_dir):
        os.utime(path, (hour_ago, hour_ago))
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([old_file, old_dir])
    assert fresh.exists() and keep.exists(), "a save in progress (fresh) and real files stay"
