"""Comparison grids (A1111's X/Y plot): one labelled image over two varying settings, for
picking a training epoch and a LoRA weight."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from studio.errors import JobStopped
from studio.generation.generate import GenerateResult, Report, generate, resolve_seed
from studio.generation.infotext import format_infotext, read_infotext, write_new_png
from studio.models.manager import ModelManager
from studio.schemas import AXIS_FIELDS, GenerateConfig, GridAxis, GridConfig, LoraSpec

AXIS_LABELS = {"lora": "LoRA", "lora_weight": "weight", "seed": "seed", "cfg": "CFG", "steps": "steps"}


@dataclass
class GridResult:
    path: Path
    cells: list[list[GenerateResult]]  # [row][column]
    warnings: list[str]


def apply_axis(config: GenerateConfig, kind: str, value) -> GenerateConfig:
    """The config of one cell: `config` with one setting replaced. The LoRA axes act on the first
    LoRA of the stack (adding one when the stack is empty)."""
    if kind in AXIS_FIELDS:  # validated, as a form's value is (model_copy would not check it)
        return GenerateConfig.model_validate({**config.model_dump(), AXIS_FIELDS[kind]: value})
    loras = list(config.loras)
    first = loras[0] if loras else None
    if kind == "lora":
        loras[:1] = [LoraSpec(path=str(value), weight=first.weight if first else 1.0)]
    elif kind == "lora_weight":
        if first is None:
            raise ValueError("a LoRA weight axis needs a LoRA: add one to the stack or use a LoRA axis too")
        loras[0] = LoraSpec(path=first.path, weight=float(value))
    return config.model_copy(update={"loras": loras})


def axis_label(axis: GridAxis, value) -> str:
    if axis.kind == "lora":
        return Path(str(value)).stem
    return f"{AXIS_LABELS[axis.kind]} {value}"


def cell_configs(grid: GridConfig) -> list[list[GenerateConfig]]:
    """Every cell's config, rows over y and columns over x. One seed for the whole grid (unless
    the seed is an axis), one image per cell, so cells differ only in what the axes vary."""
    base = grid.base.model_copy(update={"seed": resolve_seed(grid.base.seed), "batch_size": 1, "batch_count": 1})
    rows = []
    for y_value in grid.y.values if grid.y else [None]:
        row = []
        for x_value in grid.x.values:
            changes = [(grid.x.kind, x_value)] + ([(grid.y.kind, y_value)] if grid.y else [])
            changes.sort(key=lambda change: change[0] != "lora")  # a LoRA file before its weight
            cell = base
            for kind, value in changes:
                cell = apply_axis(cell, kind, value)
            row.append(cell)
        rows.append(row)
    return rows


def compose_grid(images: list[list], x_labels: list[str], y_labels: list[str]):
    """Paste cells into one image with column labels on top and row labels on the left."""
    from PIL import Image, ImageDraw, ImageFont

    cell_w, cell_h = images[0][0].size
    font = ImageFont.load_default(size=max(12, cell_h // 16))
    left = max((int(font.getlength(label)) for label in y_labels if label), default=0)
    left = left + 16 if left else 0
    top = font.size + 16 if any(x_labels) else 0
    grid = Image.new("RGB", (left + cell_w * len(x_labels), top + cell_h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(x_labels):
        draw.text((left + col * cell_w + cell_w // 2, top // 2), label, fill="black", font=font, anchor="mm")
    for row, (label, row_images) in enumerate(zip(y_labels, images)):
        if label:
            draw.text((left // 2, top + row * cell_h + cell_h // 2), label, fill="black", font=font, anchor="mm")
        for col, image in enumerate(row_images):
            grid.paste(image.convert("RGB"), (left + col * cell_w, top + row * cell_h))
    return grid


def run_grid(
    manager: ModelManager,
    grid: GridConfig,
    *,
    outputs_dir: Path,
    default_model: str,
    report: Report | None = None,
    stop: threading.Event | None = None,
    generate_cell: Callable[..., GenerateResult] = generate,
) -> GridResult:
    """Each cell is one `generate_cell` call (the app passes a GPU-call version on ZeroGPU, so no
    call holds the GPU for the whole grid)."""
    from PIL import Image

    report = report or (lambda fraction, message: None)
    configs = cell_configs(grid)
    total = sum(len(row) for row in configs)
    cells: list[list[GenerateResult]] = []
    warnings: list[str] = []
    for r, row in enumerate(configs):
        cells.append([])
        for c, config in enumerate(row):
            done = r * len(row) + c

            def cell_report(fraction, message, done=done):
                report((done + (fraction or 0.0)) / total, f"cell {done + 1}/{total}: {message}")

            if stop is not None and stop.is_set():
                raise JobStopped("grid stopped")
            result = generate_cell(manager, config, outputs_dir=outputs_dir, default_model=default_model,
                                   report=cell_report, stop=stop)
            warnings += [w for w in result.warnings if w not in warnings]
            cells[-1].append(result)
    images = [[Image.open(cell.images[0].path) for cell in row] for row in cells]
    x_labels = [axis_label(grid.x, v) for v in grid.x.values]
    y_labels = [axis_label(grid.y, v) for v in grid.y.values] if grid.y else [""]
    picture = compose_grid(images, x_labels, y_labels)
    first = cells[0][0]
    text = read_infotext(first.images[0].path) or format_infotext(first.prompt, first.negative_prompt, {})
    folder = outputs_dir / datetime.now().strftime("%Y-%m-%d") / "grids"
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.stem[5:]) for p in folder.glob("grid-[0-9][0-9][0-9][0-9].png")]
    path = write_new_png(picture, folder, lambda n: f"grid-{n:04d}.png", text, start=max(numbers, default=-1) + 1)
    report(1.0, f"grid done: {total} cells")
    return GridResult(path, cells, warnings)
