"""Preprocessor nodes, one per condition extractor in `jdm_train.extractors.EXTRACTORS`.

Each node is IMAGE (BHWC) -> IMAGE, calling exactly `jdm_train.extractors.run_extractor` on
the BCHW view, so a control image made in a workflow is the condition the student was
trained on. Widgets come from the extractor's declared parameters. Annotator weights (HED's
`weights`; depth's `model`: model folders and `dpt_hybrid-midas-501f0c75.pt`) are combos of what
ComfyUI's `annotators` model folders and comfyui_controlnet_aux's folders hold, the default name
always first so a missing file still gets the message saying where to put it; the node resolves
the name inside those folders and never reads a path it was given.
"""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..jdm_train import extractors
from ..jdm_train.extractors.weights import AnnotatorFiles, controlnet_aux_dirs, list_annotators, resolve_node_annotator
from .common import CATEGORY, check_image

# Node ids never change once shipped; new extractors get `JDM_<Name>Preprocessor`.
NODE_NAMES = {"canny": "Canny", "hed": "HED", "depth": "Depth", "lowres": "LowRes"}
# Parameters the node fills itself rather than showing.
HIDDEN_PARAMS = {"comfyui_root", "chunk"}


def annotator_folders() -> list[Path]:
    """Where the nodes look for annotator weights: ComfyUI's `annotators` folders (models/annotators,
    registered here if ComfyUI does not know it, and extra_model_paths.yaml entries) and
    comfyui_controlnet_aux's folders."""
    default = os.path.join(folder_paths.models_dir, "annotators")
    if default not in folder_paths.folder_names_and_paths.get("annotators", ([], set()))[0]:
        folder_paths.add_model_folder_path("annotators", default, is_default=True)
    dirs = folder_paths.get_folder_paths("annotators")
    dirs += controlnet_aux_dirs(folder_paths.get_folder_paths("custom_nodes"))
    return list(dict.fromkeys(Path(d) for d in dirs))


def annotator_files(name: str) -> AnnotatorFiles | None:
    """The annotator weights extractor `name` reads, if any."""
    return getattr(extractors.EXTRACTORS[name], "ANNOTATOR", None)


def _annotator_widget(files: AnnotatorFiles):
    tip = (f"{files.what} in models/annotators (or comfyui_controlnet_aux's ckpts/lllyasviel/Annotators); "
           f"{files.names[0]!r} also finds {', '.join(files.candidates(files.names[0])[1:])}. {files.how_to_get}")
    return io.Combo.Input(files.param, options=list_annotators(files, annotator_folders()), default=files.names[0],
                          tooltip=tip)


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
    """BHWC IMAGE -> BHWC condition image through `jdm_train.extractors.run_extractor`.

    An annotator name is resolved inside `annotator_folders` first: the extractor itself would
    accept any path, which a node must not read."""
    check_image(image, "image")
    names = {p.name for p in extractors.extractor_params(name)}
    if "comfyui_root" in names:
        params["comfyui_root"] = os.path.dirname(os.path.abspath(folder_paths.models_dir))
    files = annotator_files(name)
    if files is not None:
        params[files.param] = str(resolve_node_annotator(files, params.get(files.param, files.names[0]),
                                                         annotator_folders()))
    x = image[..., :3].movedim(-1, 1).to(comfy.model_management.get_torch_device())
    cond = extractors.run_extractor(name, x, **params)
    return cond.movedim(1, -1).to(device=comfy.model_management.intermediate_device(), dtype=image.dtype)


def make_preprocessor(name: str) -> type[io.ComfyNode]:
    label = NODE_NAMES.get(name, name.title().replace("_", ""))

    class Preprocessor(io.ComfyNode):
        control = name

        @classmethod
        def define_schema(cls) -> io.Schema:
            files = annotator_files(name)
            return io.Schema(
                node_id=f"JDM_{label}Preprocessor",
                display_name=f"JDM {label} Preprocessor",
                category=f"{CATEGORY}/preprocessors",
                description=f"The '{name}' condition extractor of jdm_train (the one the student was trained with).",
                inputs=[io.Image.Input("image")] + [_annotator_widget(files) if files and p.name == files.param
                                                     else _widget(p) for p in node_params(name)],
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
