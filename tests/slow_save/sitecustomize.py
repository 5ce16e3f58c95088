"""Loaded at interpreter start (PYTHONPATH) by tests/test_kill_resume.py: every safetensors save
pauses for a second after writing its file and before returning, so the test can SIGKILL the
training process while a checkpoint is half written (its temporary folder or file exists)."""

import time

import safetensors.torch

_real_save_file = safetensors.torch.save_file


def save_file(*args, **kwargs):
    result = _real_save_file(*args, **kwargs)
    time.sleep(1.0)
    return result


safetensors.torch.save_file = save_file
