"""ComfyUI nodes of ComfyUI-JDM (newer `comfy_api.latest` io style).

Imported only inside ComfyUI (relative imports: ComfyUI does not put the pack on sys.path).
Node ids carry the `JDM_` prefix and never change once shipped.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .controlnet import ApplyControlNet, ControlNetLoader
from .extractors import preprocessor_nodes
from .guider import DecoupledCFGTeacher
from .sampler import OneStepSampler, SamplerOneStep


def node_list() -> list[type[io.ComfyNode]]:
    return [OneStepSampler, SamplerOneStep, ControlNetLoader, ApplyControlNet, DecoupledCFGTeacher,
            *preprocessor_nodes()]


class JDMExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


async def comfy_entrypoint() -> JDMExtension:
    return JDMExtension()
