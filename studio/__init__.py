"""Anime LoRA Studio: caption, train and generate anime LoRAs from one app.

Importing this package does no work: heavy libraries (torch, diffusers, gradio) are imported
inside the functions that need them.
"""

__version__ = "0.1.0"
