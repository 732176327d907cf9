"""ComfyUI-JDM trainer: Joint Distribution Matching (arXiv 2503.06652) with
f-divergence distribution matching (arXiv 2502.15681) for one-step SD1.x students.

Core modules import torch, kornia, safetensors, diffusers, transformers, peft and numpy (and
OpenCV, lazily, for canny on the CPU); `train.py` alone touches accelerate, and nothing here
imports ComfyUI. The method as implemented: docs/method.md.
"""

__version__ = "0.1.0"
