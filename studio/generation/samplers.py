"""Sampler names as A1111 users know them, mapped onto diffusers schedulers.

The mapping follows diffusers' own table of A1111 equivalents. Importing this module does not
import diffusers; `make_scheduler` does, when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    name: str  # the name shown in the UI and written to infotext ("Sampler: ...")
    scheduler: str  # diffusers scheduler class
    options: dict = field(default_factory=dict)
    schedule_type: str = ""  # A1111 >= 1.9 writes "Schedule type: Karras" separately

    @property
    def infotext_name(self) -> str:
        """The sampler name without its schedule suffix, as A1111 1.9+ writes it."""
        suffix = f" {self.schedule_type}"
        return self.name[: -len(suffix)] if self.schedule_type and self.name.endswith(suffix) else self.name


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("Euler", "EulerDiscreteScheduler"),
        Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "Karras"),
        Sampler(
            "DPM++ 2M SDE Karras",
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
            "Karras",
        ),
        Sampler("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}, "Karras"),
        Sampler("DDIM", "DDIMScheduler"),
        Sampler("UniPC", "UniPCMultistepScheduler"),
    )
}
DEFAULT_SAMPLER = "Euler a"


def sampler_from_infotext(name: str, schedule_type: str = "") -> str | None:
    """Map an infotext sampler (old "DPM++ 2M Karras" or new "DPM++ 2M" + "Karras") to ours."""
    if schedule_type == "Automatic":  # A1111 1.9+: the sampler's own default schedule
        schedule_type = "Karras" if f"{name} Karras" in SAMPLERS and name not in SAMPLERS else ""
    for candidate in (f"{name} {schedule_type}".strip(), name):
        if candidate in SAMPLERS:
            return candidate
    return None


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler for `name`, built on the model's own scheduler config."""
    import diffusers

    sampler = SAMPLERS[name]
    cls = getattr(diffusers, sampler.scheduler)
    return cls.from_config(base_config, **sampler.options)
