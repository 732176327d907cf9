"""ComfyUI-JDM trainer: Joint Distribution Matching (arXiv 2503.06652) with
f-divergence distribution matching (arXiv 2502.15681) for one-step SD1.x students.

Core modules import torch, kornia, safetensors, diffusers and transformers only;
`train.py` alone touches accelerate, and nothing here imports ComfyUI.
"""

__version__ = "0.1.0"
