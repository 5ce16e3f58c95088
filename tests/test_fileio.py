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
