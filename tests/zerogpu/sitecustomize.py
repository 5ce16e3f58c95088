"""Loaded at interpreter start (PYTHONPATH) by the ZeroGPU end-to-end test, before `app.py` runs:
gives the CPU build of torch the few CUDA entry points that the real `spaces` package touches,
and nothing more. What is emulated, and why (a CPU build lacks each):
- `torch.version.cuda`: `spaces` reads the CUDA version to pick its static device facts.
- `torch._C._cuda_init`: `spaces` saves it at import, to restore it in the GPU worker.
- `torch.cuda._is_in_bad_fork`: `spaces` asks it in a forked helper process, so it must pickle
  (the CPU build's is a lambda).
- `torch._C._cuda_getCurrentRawStream`: with CUDA reported available (the app's process under
  `spaces`), bitsandbytes' CUDA backend reads it at import.
- `Tensor.cuda()` and `torch.cuda.synchronize()`: the GPU worker's start-up moves a probe tensor
  to "the GPU" and synchronises; here the tensor stays on the CPU.
The model code itself sees the real (CPU) torch inside the worker: `torch.cuda.is_available()` is
False there, so the studio runs the models on the CPU, as it would run them on the GPU.
"""

import torch


def _not_in_bad_fork() -> bool:
    return False


def _no_cuda_init() -> None:
    return None


def _synchronize(*args, **kwargs) -> None:
    return None


def _no_stream(*args, **kwargs) -> int:
    return 0


def _tensor_stays(self, *args, **kwargs):
    return self


if not torch.cuda.is_available() and torch.version.cuda is None:
    torch.version.cuda = "12.8"
    torch._C._cuda_init = _no_cuda_init
    torch.cuda._is_in_bad_fork = _not_in_bad_fork
    torch._C._cuda_getCurrentRawStream = _no_stream
    torch.cuda.synchronize = _synchronize
    torch.Tensor.cuda = _tensor_stays
