"""Datasets: scanning and validating an image folder (flat or kohya repeat folders), caption files
with undoable bulk edits, safe imports of uploads and zips, kohya bucketing and near-duplicate
detection. Needs Pillow and numpy only: no torch here.

    dataset = Dataset.open("datasets/alice")
    dataset.report.summary()            # what was found, what was skipped and why
    dataset.add_tags(dataset.items, ["alice"], position="front")
    dataset.undo_last()
"""

from studio.dataset.buckets import (
    BucketAssignment,
    Bucketer,
    BucketPreview,
    make_bucket_resolutions,
    preview_buckets,
)
from studio.dataset.config import BucketConfig, ImportLimits, ScanOptions
from studio.dataset.dataset import Dataset, EditResult
from studio.dataset.dedupe import dhash, find_near_duplicates, group_near_duplicates, hamming, phash
from studio.dataset.images import ImageHeader, image_extensions, load_rgb, to_rgb
from studio.dataset.importer import ImportedFile, ImportReport, import_files, import_uploads, import_zip
from studio.dataset.model import DatasetItem, Problem, ScanReport, Subset, parse_repeat_folder
from studio.dataset.scan import inspect_image, scan_dataset, scan_headers
from studio.dataset.undo import UndoEntry, UndoResult

__all__ = [
    "BucketAssignment",
    "BucketConfig",
    "BucketPreview",
    "Bucketer",
    "Dataset",
    "DatasetItem",
    "EditResult",
    "ImageHeader",
    "ImportLimits",
    "ImportReport",
    "ImportedFile",
    "Problem",
    "ScanOptions",
    "ScanReport",
    "Subset",
    "UndoEntry",
    "UndoResult",
    "dhash",
    "find_near_duplicates",
    "group_near_duplicates",
    "hamming",
    "image_extensions",
    "import_files",
    "import_uploads",
    "import_zip",
    "inspect_image",
    "load_rgb",
    "make_bucket_resolutions",
    "parse_repeat_folder",
    "phash",
    "preview_buckets",
    "scan_dataset",
    "scan_headers",
    "to_rgb",
]
