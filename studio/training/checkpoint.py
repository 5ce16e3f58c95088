"""Training state on disk, without pickle: tensors in safetensors files, everything else in JSON.

A state folder holds the network weights, the optimizer and LR scheduler state, the step and epoch,
the RNG states and the resume fingerprint of the config. It is written into a temporary folder and
renamed into place, so a crash or a full disk mid-save leaves the previous state intact."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError, write_error

STATE_DIR = "state"
_PREFIX = "step-"


@dataclass(frozen=True)
class TrainingState:
    step: int
    micro_step: int
    epoch: int
    fingerprint: dict
    losses: list[float]  # the smoothed-loss window, so the smoothed curve continues exactly


def _split(value, path: str, tensors: dict):
    """Tensors out of a nested state (bitsandbytes keeps its 8-bit state in nested dicts) into
    `tensors` by dotted path; what is left is JSON-able."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {str(key): _split(item, f"{path}.{key}", tensors) for key, item in value.items()}
    return value


def _join(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {key: _join(item, tensors) for key, item in value.items()}
    return value


def _split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """optimizer.state_dict() -> (tensors by flat name, JSON-able rest)."""
    tensors: dict = {}
    plain = {"param_groups": state["param_groups"],
             "state": {str(index): _split(values, str(index), tensors) for index, values in state["state"].items()}}
    return tensors, plain


def _join_optimizer_state(tensors: dict, plain: dict) -> dict:
    state = {int(index): _join(values, tensors) for index, values in plain["state"].items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def _rng_states() -> dict:
    import torch

    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = state
    return states


def save_state(run_dir: Path, state: TrainingState, network: dict[str, dict], optimizer, scheduler) -> Path:
    """Write the full training state for `state.step`; returns its folder."""
    from safetensors.torch import save_file

    root = run_dir / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:07d}"
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        flat = {f"{part}::{key}": value.detach().to("cpu").contiguous()
                for part, weights in network.items() for key, value in weights.items()}
        save_file(flat, str(tmp / "network.safetensors"))
        tensors, plain = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors or {"_empty": _empty()}, str(tmp / "optimizer.safetensors"))
        save_file(_rng_states(), str(tmp / "rng.safetensors"))
        meta = {
            "step": state.step, "micro_step": state.micro_step, "epoch": state.epoch,
            "fingerprint": state.fingerprint, "losses": state.losses,
            "optimizer": plain, "scheduler": scheduler.state_dict(),
        }
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as exc:
        raise (write_error(final, exc) or exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _empty():
    import torch

    return torch.zeros(0)


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot save {type(value).__name__} in trainer.json")


def list_states(run_dir: Path) -> list[Path]:
    root = run_dir / STATE_DIR
    return sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / "trainer.json").is_file()) \
        if root.is_dir() else []


def read_state(folder: Path) -> tuple[TrainingState, dict]:
    meta = json.loads((folder / "trainer.json").read_text())
    state = TrainingState(meta["step"], meta["micro_step"], meta["epoch"], meta["fingerprint"], meta["losses"])
    return state, meta


def load_state(folder: Path, optimizer, scheduler) -> tuple[TrainingState, dict[str, dict]]:
    """Restore optimizer, scheduler and RNG states; returns the state and the network weights."""
    import torch
    from safetensors.torch import load_file

    state, meta = read_state(folder)
    network: dict[str, dict] = {}
    for key, value in load_file(str(folder / "network.safetensors")).items():
        part, name = key.split("::", 1)
        network.setdefault(part, {})[name] = value
    tensors = {k: v for k, v in load_file(str(folder / "optimizer.safetensors")).items() if k != "_empty"}
    optimizer.load_state_dict(_join_optimizer_state(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return state, network


def prune_states(run_dir: Path, keep: int) -> None:
    for folder in list_states(run_dir)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def check_resumable(folder: Path, fingerprint: dict) -> None:
    from studio.training.config import changed_settings

    state, _ = read_state(folder)
    changes = changed_settings(state.fingerprint, fingerprint)
    if changes:
        raise StudioError("cannot resume with a changed config; these settings differ from the run's: "
                          + "; ".join(changes) + ". Start a new run, or restore them.")
