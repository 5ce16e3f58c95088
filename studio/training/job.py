"""Training as a background job of the app: it takes the GPU lane for itself (a generation or
captioning request meanwhile is refused with a message), unloads the other models first, and
streams events into the job so the Train tab can plot them; the run folder keeps them too, so a
page reload (or an app restart) finds the curve again."""

from __future__ import annotations

from pathlib import Path

from studio.jobs import Job, JobRunner
from studio.models.manager import ModelManager
from studio.training.config import TrainConfig

JOB_NAME = "train"


def start_training(jobs: JobRunner, manager: ModelManager, config: TrainConfig, *, run_dir: Path,
                   workspace: Path, resume: bool = False) -> Job:
    """Start (or resume) a run in the background; `job.stop()` stops it after the current step,
    saving a resumable checkpoint."""
    from studio.training.runs import write_run_config
    from studio.training.trainer import train

    running = jobs.latest(JOB_NAME)
    if running is not None and running.running:
        from studio.errors import BusyError

        raise BusyError(f"a training run is already going ({running.message}); stop it first")
    write_run_config(run_dir, config)

    def work(job: Job):
        with manager.gpu_lane(f"training {config.output_name}", exclusive=True):
            manager.unload()  # captioner and generation pipelines give their memory to training
            job.report(0.0, "starting")

            def on_event(event):
                fraction = None
                if event.kind == "step" and event.data.get("eta_s") is not None:
                    total = event.step + event.data["eta_s"] * (event.data.get("it_s") or 0)
                    fraction = event.step / total if total else None
                text = event.data.get("text") or f"step {event.step}"
                data = {k: v for k, v in event.data.items() if k != "fraction"}  # caching's own progress
                job.report(fraction, text, kind=event.kind, step=event.step, epoch=event.epoch, **data)

            result = train(config, run_dir=run_dir, models_dir=workspace / "models", cache_dir=workspace / "cache",
                           resume=resume, stop=job.stop_event, on_event=on_event)
            job.report(1.0 if result.status == "done" else job.fraction, result.message)
            return result

    return jobs.start(JOB_NAME, work)
