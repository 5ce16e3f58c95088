"""Swapping onnxruntime for onnxruntime-gpu on a GPU Space (pip is recorded, never run here)."""

from studio.onnx_gpu import ensure_gpu_onnxruntime, has_nvidia_gpu


def versions(**installed):
    return lambda name: installed.get(name.replace("-", "_"))


def test_the_cpu_build_is_swapped_for_the_gpu_build_of_the_same_version():
    calls = []
    message = ensure_gpu_onnxruntime(pip=lambda args: calls.append(args) or 0, version_of=versions(onnxruntime="1.31.1"))
    assert calls == [["uninstall", "-y", "-q", "onnxruntime"], ["install", "-q", "--no-deps", "onnxruntime-gpu==1.31.1"]]
    assert "runs on the GPU" in message


def test_a_failed_install_puts_the_cpu_build_back():
    calls = []

    def pip(args):
        calls.append(args)
        return 1 if "onnxruntime-gpu==1.31.1" in args else 0

    message = ensure_gpu_onnxruntime(pip=pip, version_of=versions(onnxruntime="1.31.1"))
    assert calls[-1] == ["install", "-q", "--no-deps", "onnxruntime==1.31.1"] and "runs on the CPU" in message


def test_nothing_happens_when_the_gpu_build_is_there():
    calls = []
    ensure_gpu_onnxruntime(pip=lambda args: calls.append(args) or 0,
                           version_of=versions(onnxruntime="1.31.1", onnxruntime_gpu="1.31.1"))
    assert calls == []


def test_a_gpu_is_an_nvidia_driver_with_a_device(tmp_path):
    assert not has_nvidia_gpu(tmp_path / "missing")
    (tmp_path / "gpus").mkdir()
    assert not has_nvidia_gpu(tmp_path / "gpus")
    (tmp_path / "gpus" / "0000:00:1e.0").mkdir()
    assert has_nvidia_gpu(tmp_path / "gpus")
