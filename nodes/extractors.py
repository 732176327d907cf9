"""Preprocessor nodes, one per condition extractor in `jdm_train.extractors.EXTRACTORS`.

Each node is IMAGE (BHWC) -> IMAGE, calling exactly `jdm_train.extractors.run_extractor` on
the BCHW view, so a control image made in a workflow is the condition the student was
trained on. Widgets come from the extractor's declared parameters; weight-file names are
string widgets (looked up in models/annotators and comfyui_controlnet_aux's folders).
"""

from __future__ import annotations

import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..jdm_train import extractors
from .common import CATEGORY, check_image

# Node ids never change once shipped; new extractors get `JDM_<Name>Preprocessor`.
NODE_NAMES = {"canny": "Canny", "hed": "HED", "depth": "Depth", "lowres": "LowRes"}
# Parameters the node fills itself rather than showing.
HIDDEN_PARAMS = {"comfyui_root", "chunk"}


def _widget(p: extractors.Param):
    tip = p.tooltip or None
    if p.kind == "bool":
        return io.Boolean.Input(p.name, default=p.default, tooltip=tip)
    if p.kind == "int":
        return io.Int.Input(p.name, default=p.default, min=None if p.min is None else int(p.min),
                            max=None if p.max is None else int(p.max), step=None if p.step is None else int(p.step),
                            tooltip=tip)
    if p.kind == "float":
        return io.Float.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step, tooltip=tip)
    if p.choices is not None:
        return io.Combo.Input(p.name, options=list(p.choices), default=p.default, tooltip=tip)
    return io.String.Input(p.name, default=p.default, tooltip=tip)


def node_params(name: str) -> list[extractors.Param]:
    return [p for p in extractors.extractor_params(name) if p.name not in HIDDEN_PARAMS]


def run(name: str, image, **params):
    """BHWC IMAGE -> BHWC condition image through `jdm_train.extractors.run_extractor`."""
    check_image(image, "image")
    names = {p.name for p in extractors.extractor_params(name)}
    if "comfyui_root" in names:
        params["comfyui_root"] = os.path.dirname(os.path.abspath(folder_paths.models_dir))
    x = image[..., :3].movedim(-1, 1).to(comfy.model_management.get_torch_device())
    cond = extractors.run_extractor(name, x, **params)
    return cond.movedim(1, -1).to(device=comfy.model_management.intermediate_device(), dtype=image.dtype)


def make_preprocessor(name: str) -> type[io.ComfyNode]:
    label = NODE_NAMES.get(name, name.title().replace("_", ""))

    class Preprocessor(io.ComfyNode):
        control = name

        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=f"JDM_{label}Preprocessor",
                display_name=f"JDM {label} Preprocessor",
                category=f"{CATEGORY}/preprocessors",
                description=f"The '{name}' condition extractor of jdm_train (the one the student was trained with).",
                inputs=[io.Image.Input("image")] + [_widget(p) for p in node_params(name)],
                outputs=[io.Image.Output(display_name="IMAGE"),
                         io.String.Output(display_name="control", tooltip=f"'{name}', for JDM Apply ControlNet.")],
            )

        @classmethod
        def execute(cls, image, **params) -> io.NodeOutput:
            return io.NodeOutput(run(cls.control, image, **params), cls.control)

    Preprocessor.__name__ = Preprocessor.__qualname__ = f"{label}Preprocessor"
    return Preprocessor


def preprocessor_nodes() -> list[type[io.ComfyNode]]:
    return [make_preprocessor(n) for n in extractors.extractor_names()]
