"""Learning-rate schedules, by kohya's names, as pure functions of the optimizer step.

A schedule gives a *multiplier* of the base learning rate: the LR used by optimizer step `i`
(counted from 0) is `base_lr * schedule.multiplier(i)`. One multiplier scales every parameter
group, so a run with `unet_lr=1e-4` and `text_encoder_lr=5e-5` keeps that 2:1 ratio at every step.

Conventions shared by all schedules:
- `total_steps` is the run's number of optimizer steps. Decaying schedules reach their floor at
  `multiplier(total_steps)`, one past the last step, as diffusers' and kohya's do; later steps
  stay at the floor.
- Warmup is `warmup_steps`, or `warmup_ratio` of the span it belongs to (the whole run, or one
  cycle for `cosine_with_restarts`); give one or neither. It rises linearly from the floor to the
  peak: `multiplier(0) = floor`, `multiplier(warmup) = peak`. With the default floor of 0 this is
  the usual warmup, whose first step has LR 0.
- The floor is `min_lr_ratio`, a ratio of each group's base LR, not an absolute LR: an absolute
  minimum could not be one multiplier for groups with different LRs. Animagine XL 3.1's
  `min_lr=1e-6` with `lr=1e-5` is `min_lr_ratio=0.1`.
- A setting that the chosen schedule would ignore is refused (ConfigError), never dropped.

`cosine_with_restarts` is Animagine XL 3.1's variant, not diffusers' "hard restarts" (which has a
single warmup): the run is cut into `num_cycles` cycles of (nearly) equal length; each cycle warms
up from the floor to its peak, then follows a half cosine down to the floor. Cycle k's peak is
`cycle_decay ** k` (Animagine used 0.9; 1.0 gives classic warm restarts).

This module is pure math; `make_lr_scheduler` imports torch only when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from studio.errors import ConfigError

if TYPE_CHECKING:
    import torch

SCHEDULER_NAMES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
_DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def linear_decay(progress: float) -> float:
    """1 at progress 0, 0 at progress 1."""
    return 1.0 - progress


def cosine_decay(progress: float) -> float:
    """Half a cosine: 1 at progress 0, 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_then_decay(step: int, warmup: int, span: int, floor: float, peak: float,
                      decay: Callable[[float], float]) -> float:
    """The multiplier at `step` of a span of `span` steps: linear from `floor` to `peak` over
    `warmup` steps, then `floor + (peak - floor) * decay(progress)` as progress goes 0 -> 1 over
    the remaining steps; `floor` from `span` on."""
    if step < warmup:
        return floor + (peak - floor) * step / warmup
    progress = min(1.0, (step - warmup) / (span - warmup))
    return floor + (peak - floor) * decay(progress)


@dataclass(frozen=True)
class LRSchedule:
    """A validated schedule; `multiplier(step)` is a pure function of the step."""

    name: str
    total_steps: int
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # of the run, or of one cycle for cosine_with_restarts
    num_cycles: int = 1  # cosine_with_restarts only
    cycle_decay: float = 1.0  # cosine_with_restarts only: cycle k peaks at cycle_decay ** k
    min_lr_ratio: float = 0.0  # decaying schedules only: the floor, a ratio of the base LR
    power: float = 1.0  # polynomial only: (1 - progress) ** power

    def __post_init__(self) -> None:
        if self.name not in SCHEDULER_NAMES:
            raise ConfigError(f"unknown LR scheduler {self.name!r}; "
                              f"choose one of: {', '.join(SCHEDULER_NAMES)}")
        if self.total_steps < 1:
            raise ConfigError(f"total_steps must be at least 1, got {self.total_steps}")
        self._check_only_for("cosine_with_restarts", num_cycles=(self.num_cycles, 1),
                             cycle_decay=(self.cycle_decay, 1.0))
        self._check_only_for("polynomial", power=(self.power, 1.0))
        if self.power <= 0:
            raise ConfigError(f"power must be positive, got {self.power}")
        if self.name in _DECAYING:
            if not 0.0 <= self.min_lr_ratio < 1.0:
                raise ConfigError(f"min_lr_ratio is a ratio of the base LR in [0, 1), "
                                  f"got {self.min_lr_ratio}")
        elif self.min_lr_ratio != 0.0:
            raise ConfigError(f"min_lr_ratio applies to decaying schedules ({', '.join(_DECAYING)}), "
                              f"not {self.name!r}; set it to 0")
        if self.name == "cosine_with_restarts":
            self._check_cycles()
        self._check_warmup()

    def _check_only_for(self, owner: str, **settings: tuple[float, float]) -> None:
        for setting, (value, default) in settings.items():
            if self.name != owner and value != default:
                raise ConfigError(f"{setting}={value} only applies to the {owner!r} scheduler, not "
                                  f"{self.name!r}; set it to {default}")

    def _check_warmup(self) -> None:
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("warmup_steps must be >= 0 and warmup_ratio in [0, 1), got "
                              f"{self.warmup_steps} and {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("give warmup_steps or warmup_ratio, not both")
        if self.name == "constant" and self.warmup:
            raise ConfigError("the 'constant' scheduler has no warmup; use 'constant_with_warmup'")
        span = self.total_steps // self.num_cycles  # the shortest cycle
        if self.warmup >= span:
            what = "each cycle" if self.name == "cosine_with_restarts" else "the run"
            raise ConfigError(f"a warmup of {self.warmup} steps never ends: "
                              f"{what} has {span} steps")

    def _check_cycles(self) -> None:
        if not 1 <= self.num_cycles <= self.total_steps:
            raise ConfigError(f"num_cycles must be between 1 and total_steps ({self.total_steps}), "
                              f"got {self.num_cycles}")
        if not 0.0 < self.cycle_decay <= 1.0:
            raise ConfigError(f"cycle_decay must be in (0, 1], got {self.cycle_decay}")
        last_peak = self.cycle_decay ** (self.num_cycles - 1)
        if last_peak <= self.min_lr_ratio:
            raise ConfigError(f"the last cycle's peak ({self.cycle_decay}^{self.num_cycles - 1} = "
                              f"{last_peak:.4g}) is not above min_lr_ratio ({self.min_lr_ratio}): "
                              "raise cycle_decay, use fewer cycles or lower min_lr_ratio")

    @property
    def warmup(self) -> int:
        """Warmup steps: of the run, or of each cycle for cosine_with_restarts."""
        if self.warmup_steps:
            return self.warmup_steps
        return int(self.warmup_ratio * self.total_steps / self.num_cycles)

    def cycle_start(self, k: int) -> int:
        """The first step of cycle k (cosine_with_restarts); cycle_start(num_cycles) = total_steps."""
        return k * self.total_steps // self.num_cycles

    def cycle_of(self, step: int) -> int:
        """The cycle that `step` belongs to (the last one for steps past the end)."""
        return min(self.num_cycles - 1, ((step + 1) * self.num_cycles - 1) // self.total_steps)

    def multiplier(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        floor, end = self.min_lr_ratio, self.total_steps
        if self.name == "constant":
            return 1.0
        if self.name == "constant_with_warmup":
            return 1.0 if step >= self.warmup else step / self.warmup
        if self.name == "linear":
            return warmup_then_decay(step, self.warmup, end, floor, 1.0, linear_decay)
        if self.name == "cosine":
            return warmup_then_decay(step, self.warmup, end, floor, 1.0, cosine_decay)
        if self.name == "polynomial":
            return warmup_then_decay(step, self.warmup, end, floor, 1.0,
                                     lambda progress: (1.0 - progress) ** self.power)
        if step >= end:
            return floor
        k = self.cycle_of(step)
        start, length = self.cycle_start(k), self.cycle_start(k + 1) - self.cycle_start(k)
        return warmup_then_decay(step - start, self.warmup, length, floor, self.cycle_decay**k, cosine_decay)

    def lr_at(self, step: int, base_lr: float) -> float:
        """The absolute learning rate at `step` for a group whose base LR is `base_lr`."""
        return base_lr * self.multiplier(step)


def make_lr_scheduler(optimizer: torch.optim.Optimizer,
                      schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that applies `schedule` to every parameter group of `optimizer`.

    Its state_dict holds the step count and base LRs, not the schedule (which comes from the
    config). To resume exactly: build the optimizer, then this scheduler, then load the
    optimizer's state_dict, then the scheduler's. Call `scheduler.step()` after each
    `optimizer.step()`.
    """
    from torch.optim.lr_scheduler import LambdaLR

    def lr_lambda(step: int) -> float:
        return schedule.multiplier(step)

    return LambdaLR(optimizer, lr_lambda)
