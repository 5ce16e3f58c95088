"""Comparison grids (A1111's X/Y plot): one labelled image over two varying settings, for
picking a training epoch and a LoRA weight."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from studio.errors import JobStopped
from studio.generation.generate import GenerateResult, Report, generate, resolve_seed
from studio.generation.infotext import format_infotext, parse_infotext, read_infotext, write_new_png
from studio.models.manager import ModelManager
from studio.schemas import AXIS_FIELDS, GenerateConfig, GridAxis, GridConfig, LoraSpec

AXIS_LABELS = {"lora": "LoRA", "lora_weight": "weight", "seed": "seed", "cfg": "CFG", "steps": "steps"}
AXIS_TYPES = {"lora": "LoRA file", "lora_weight": "LoRA weight", "seed": "Seed", "cfg": "CFG Scale", "steps": "Steps"}


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


_STEP = re.compile(r"-step0*(\d+)$")  # ours: name-step00000010
_EPOCH = re.compile(r"-(\d{6})$")  # kohya's: name-000004
_COPY = re.compile(r" \(\d+\)$")  # a second copy in workspace/loras: name (1)


def checkpoint_label(stem: str, stems: list[str]) -> str:
    """A checkpoint's short name among the grid's files: `step 10` (ours), `epoch 4` (kohya's
    `name-000004`), `final` (the run's file without a number; a copy's ` (1)` aside), else what
    differs from the other files' names."""
    if match := _STEP.search(stem):
        return f"step {int(match.group(1))}"
    bases = {_STEP.sub("", other) for other in stems if _STEP.search(other)}
    bases |= {_EPOCH.sub("", other) for other in stems if _EPOCH.search(other) and other != stem}
    if (match := _EPOCH.search(stem)) and stem[:match.start()] in bases | {_COPY.sub("", o) for o in stems if o != stem}:
        return f"epoch {int(match.group(1))}"
    if _COPY.sub("", stem) in bases:
        return "final"
    prefix = os.path.commonprefix(stems) if len(stems) > 1 else ""
    prefix = prefix[:max(prefix.rfind(sep) for sep in "-_ ") + 1]  # whole words only
    return stem[len(prefix):].strip("-_ ") or stem


def axis_labels(axis: GridAxis) -> list[str]:
    """Short labels for the image (the full values go in the infotext): a checkpoint by its step
    or epoch, a weight as `weight 0.8`."""
    if axis.kind == "lora":
        stems = [Path(str(value)).stem for value in axis.values]
        return [checkpoint_label(stem, stems) for stem in stems]
    return [f"{AXIS_LABELS[axis.kind]} {value}" for value in axis.values]


def axis_label(axis: GridAxis, value) -> str:
    return axis_labels(axis)[list(axis.values).index(value)]


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


def _wrapped(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` (at spaces, or inside a long word)."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        while font.getlength(word) > width and len(word) > 1:
            cut = max(1, next((i for i in range(len(word), 0, -1) if font.getlength(word[:i]) <= width), 1))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def compose_grid(images: list[list], x_labels: list[str], y_labels: list[str]):
    """Paste cells into one image with column labels on top and row labels on the left; a label
    wider than its cell wraps onto more lines (never into the next column)."""
    from PIL import Image, ImageDraw, ImageFont

    cell_w, cell_h = images[0][0].size
    font = ImageFont.load_default(size=max(12, min(cell_h, cell_w) // 16))
    line_h = font.size + 4
    x_lines = [_wrapped(label, font, cell_w - 8) for label in x_labels]
    top = max(len(lines) for lines in x_lines) * line_h + 12 if any(x_labels) else 0
    y_width = min(cell_w, max((int(font.getlength(label)) for label in y_labels if label), default=0))
    y_lines = [_wrapped(label, font, y_width) if label else [] for label in y_labels]
    left = y_width + 16 if y_width else 0
    grid = Image.new("RGB", (left + cell_w * len(x_labels), top + cell_h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for col, lines in enumerate(x_lines):
        draw.multiline_text((left + col * cell_w + cell_w // 2, top // 2), "\n".join(lines), fill="black",
                            font=font, anchor="mm", align="center", spacing=4)
    for row, (lines, row_images) in enumerate(zip(y_lines, images)):
        if lines:
            draw.multiline_text((left // 2, top + row * cell_h + cell_h // 2), "\n".join(lines), fill="black",
                                font=font, anchor="mm", align="center", spacing=4)
        for col, image in enumerate(row_images):
            grid.paste(image.convert("RGB"), (left + col * cell_w, top + row * cell_h))
    return grid


def grid_infotext(first_cell_text: str, grid: GridConfig) -> str:
    """The first cell's infotext plus the axes with their full values, as A1111's X/Y/Z plot
    writes them (`Script: X/Y/Z plot, X Type: ..., X Values: ...`)."""
    prompt, negative, params = parse_infotext(first_cell_text)
    params = dict(params, Script="X/Y/Z plot")
    for name, axis in (("X", grid.x), ("Y", grid.y)):
        if axis is not None:
            values = [Path(str(v)).name if axis.kind == "lora" else v for v in axis.values]
            params[f"{name} Type"] = AXIS_TYPES[axis.kind]
            params[f"{name} Values"] = ", ".join(str(v) for v in values)
    return format_infotext(prompt, negative, params)


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
    picture = compose_grid(images, axis_labels(grid.x), axis_labels(grid.y) if grid.y else [""])
    first = cells[0][0]
    text = grid_infotext(read_infotext(first.images[0].path) or format_infotext(first.prompt, first.negative_prompt, {}),
                         grid)
    folder = outputs_dir / datetime.now().strftime("%Y-%m-%d") / "grids"
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.stem[5:]) for p in folder.glob("grid-[0-9][0-9][0-9][0-9].png")]
    path = write_new_png(picture, folder, lambda n: f"grid-{n:04d}.png", text, start=max(numbers, default=-1) + 1)
    report(1.0, f"grid done: {total} cells")
    return GridResult(path, cells, warnings)
