"""The demo tagger: a tiny random-weight ONNX tagger with a real WD v3 tagger's interface.

Same files (`model.onnx` + `selected_tags.csv` with the columns tag_id, name, category, count),
same input (NHWC float32 BGR 0-255, dynamic batch; only the side is small: 64 instead of 448, read
from the model like a real tagger's), same output (one sigmoid probability per tag). It is loaded
by the same `Tagger.load` as the real taggers.

The network looks at the image: average pooling to an 8x8 grid of colours, one strided
convolution with tanh, one linear layer and a sigmoid, so different images get different tags.
The biases are chosen so that typical images get about six general tags at the default
thresholds (1girl and solo nearly always, as on a real anime dataset), a rating (mostly
"general") and now and then a character.

The graph is written with the `onnx` helper API from numpy weights (fixed seed), not exported from
torch: building it needs only numpy and onnx, not torch's exporter and its onnxscript dependency,
so `python app.py --demo` works from requirements.txt alone. Importing this module does no work.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from studio.errors import StudioError
from studio.fileio import folder_is_complete, write_complete_folder

DEMO_TAGGER_NAME = "demo-tagger"
DEMO_TAGGER_SEED = 0
DEMO_TAGGER_VERSION = 1  # bump when the graph or vocabulary changes: older caches are rebuilt
INPUT_SIDE = 64
CELL = 8  # the image is averaged over 8x8-pixel cells (an 8x8 grid of colours) ...
CONV_CHANNELS = 8  # ... then one strided 3x3 convolution with tanh gives a 4x4 map of 8 features
GRID = INPUT_SIDE // CELL // 2
CONV_GAIN = 1.5
HEAD_GAIN = 1.5
OPSET = 13
IR_VERSION = 8  # an old IR version so that older onnxruntime releases load the file too

# (name, category, logit bias). Category 9 = rating, 0 = general, 4 = character.
DEMO_TAGS: list[tuple[str, int, float]] = [
    ("general", 9, 3.0), ("sensitive", 9, 0.5), ("questionable", 9, -0.5), ("explicit", 9, -1.5),
    ("1girl", 0, 3.0), ("solo", 0, 2.5), ("long_hair", 0, -0.6), ("short_hair", 0, -1.6),
    ("smile", 0, -0.8), ("open_mouth", 0, -1.4), ("blush", 0, -1.1), ("looking_at_viewer", 0, -0.3),
    ("blue_eyes", 0, -1.3), ("red_eyes", 0, -1.7), ("brown_hair", 0, -1.5), ("black_hair", 0, -1.5),
    ("blonde_hair", 0, -1.7), ("shirt", 0, -1.1), ("skirt", 0, -1.4), ("school_uniform", 0, -1.9),
    ("simple_background", 0, -0.9), ("white_background", 0, -1.3), ("outdoors", 0, -1.9),
    ("sky", 0, -1.9), ("hat", 0, -2.1), ("holding", 0, -1.9), ("star_(symbol)", 0, -2.3),
    ("^_^", 0, -2.1), (">_<", 0, -2.6),
    ("hatsune_miku", 4, 0.2), ("hakurei_reimu", 4, -0.5), ("kirisame_marisa", 4, -2.0),
    ("kagamine_rin", 4, -2.5),
]
_TAG_ID_BASE = {9: 9_999_999, 0: 400_000, 4: 900_000}  # rating ids count down like the real file's


def selected_tags_csv() -> str:
    """The demo vocabulary in selected_tags.csv form (tag_id, name, category, count)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tag_id", "name", "category", "count"])
    for row, (name, category, _) in enumerate(DEMO_TAGS):
        tag_id = _TAG_ID_BASE[category] + (-row if category == 9 else row)
        writer.writerow([tag_id, name, category, 100_000 // (row + 1)])
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------
def _demo_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = CONV_CHANNELS * GRID * GRID
    biases = np.array([bias for _, _, bias in DEMO_TAGS], dtype=np.float32)
    return {
        "to_unit": np.array(1 / 127.5, dtype=np.float32),
        "one": np.array(1.0, dtype=np.float32),
        "conv.weight": rng.normal(0.0, CONV_GAIN / np.sqrt(27), (CONV_CHANNELS, 3, 3, 3)).astype(np.float32),
        "conv.bias": np.zeros(CONV_CHANNELS, np.float32),
        "head.weight": rng.normal(0.0, HEAD_GAIN / np.sqrt(features), (features, len(DEMO_TAGS)))
        .astype(np.float32),
        "head.bias": biases,
    }


def build_demo_tagger_model(seed: int = DEMO_TAGGER_SEED):
    """The demo tagger as an onnx.ModelProto; the same seed gives the same bytes."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise StudioError(
            "building the demo tagger needs the `onnx` package: pip install -r requirements.txt"
        ) from None

    weights = _demo_weights(seed)
    node = helper.make_node
    nodes = [
        node("Mul", ["input", "to_unit"], ["scaled"]),  # 0-255 -> 0-2
        node("Sub", ["scaled", "one"], ["centred"]),  # -> -1..1
        node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
        node("AveragePool", ["nchw"], ["cells"], kernel_shape=[CELL, CELL], strides=[CELL, CELL]),
        node("Conv", ["cells", "conv.weight", "conv.bias"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
        node("Tanh", ["conv"], ["act"]),
        node("Flatten", ["act"], ["features"], axis=1),
        node("Gemm", ["features", "head.weight", "head.bias"], ["logits"]),
        node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_tagger",
        inputs=[
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", INPUT_SIDE, INPUT_SIDE, 3])
        ],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(DEMO_TAGS)])],
        initializer=[numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="anime-lora-studio",
        doc_string="Demo tagger: tiny, random weights, WD v3 tagger interface. Not a real tagger.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"seed": str(seed), "version": str(DEMO_TAGGER_VERSION)})
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------
# The demo tagger in a models cache
# ---------------------------------------------------------------------------------------------
def ensure_demo_tagger(models_dir: Path) -> Path:
    """Write `models_dir/demo-tagger/` (model.onnx, selected_tags.csv) once and return it.

    The files are written into a temporary sibling folder, the marker last, and the folder is
    renamed into place; a folder without a current marker (a crash midway, an older version) is
    rebuilt. Later calls return at once without writing.
    """
    folder = Path(models_dir) / DEMO_TAGGER_NAME
    if folder_is_complete(folder, DEMO_TAGGER_VERSION):
        return folder

    def fill(tmp: Path) -> None:
        (tmp / "model.onnx").write_bytes(build_demo_tagger_model(DEMO_TAGGER_SEED).SerializeToString())
        (tmp / "selected_tags.csv").write_text(selected_tags_csv(), encoding="utf-8")

    return write_complete_folder(folder, fill, {"version": DEMO_TAGGER_VERSION, "seed": DEMO_TAGGER_SEED})
