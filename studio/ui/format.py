"""Formatters shared by the tabs: job progress lines and the model manager's status panel."""

from __future__ import annotations

from studio.jobs import Job
from studio.models.manager import ManagerStatus

GiB = 1024**3


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def job_status_line(job: Job) -> str:
    """'42% · batch 1/2: step 5/16 · 12s elapsed · ETA 16s' for a running job."""
    fraction = job.fraction
    parts = []
    if fraction is not None:
        parts.append(f"{fraction * 100:.0f}%")
    if job.message:
        parts.append(job.message)
    parts.append(f"{_duration(job.elapsed)} elapsed")
    if fraction and 0.02 < fraction < 1:
        parts.append(f"ETA {_duration(job.elapsed * (1 - fraction) / fraction)}")
    return " · ".join(parts)


def manager_status_markdown(status: ManagerStatus, demo: bool) -> str:
    device = status.device
    memory = ""
    if device.total_bytes:
        memory = f", {device.total_bytes / GiB:.0f} GB"
    lines = [f"**Device:** {device.name} (`{device.execution_device}`{memory}) · **VRAM policy:** {status.requested_policy}"]
    if status.lane_owner:
        lines.append(f"**Busy:** {status.lane_owner}")
    if status.models:
        rows = ", ".join(
            f"{m['name']} ({m['size_gb']} GB, {m['where']}{', in use' if m['locked'] else ''})" for m in status.models
        )
        lines.append(f"**Loaded:** {rows}")
    else:
        lines.append("**Loaded:** nothing yet (models load on first use)")
    if demo:
        lines.append("**Demo mode:** the models are tiny random-weight models for trying the workflow; "
                     "their images look like noise.")
    return "  \n".join(lines)
