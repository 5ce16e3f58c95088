"""Captioning: booru-tag taggers (WD v3 through onnxruntime, and a tiny offline demo tagger),
natural-language captioners and the tag rules that turn their output into caption files.

Importing this package does no work: onnxruntime, onnx and the models load inside the functions
that need them.
"""
