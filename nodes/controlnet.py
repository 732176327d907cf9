"""JDM ControlNet Loader and JDM Apply ControlNet.

The loader reads a JDM ControlNet export (cldm layout with ``jdm.*`` metadata), or any
plain LDM / diffusers ControlNet, with ComfyUI's own `comfy.controlnet.load_controlnet`, and
reports the control it was trained for and the student's generator timestep, so a workflow
can route the matching preprocessor and timestep. JDM Apply ControlNet attaches it to the
positive conditioning (the one-step student has no negative branch) and refuses an image
made by a preprocessor for another control.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import comfy.controlnet
import folder_paths
from comfy_api.latest import io

from ..jdm_train import model_io
from ..jdm_train.sampling import DEFAULT_GENERATOR_TIMESTEP
from .common import CATEGORY, check_conditioning, check_image

log = logging.getLogger(__name__)

# Attribute set on the loaded ControlNet object so JDM Apply ControlNet can compare controls.
CONTROL_ATTR = "jdm_control"
_CLDM_KEYS = ("zero_convs.0.0.weight", "control_model.zero_convs.0.0.weight")
_DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"


def _keys(path) -> list[str]:
    try:
        if str(path).lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        import comfy.utils

        return list(comfy.utils.load_torch_file(str(path), safe_load=True).keys())
    except Exception as e:  # SafetensorError, a truncated pickle, ...: say which file and which input
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise ValueError(f"control_net_name: {path} ({size} bytes) is not a readable weight file: empty, truncated "
                         f"or corrupt ({type(e).__name__}: {e}); expected a complete ControlNet .safetensors, "
                         f"download or export it again") from e


def _what(keys: list[str]) -> str:
    ks = set(keys)
    if any(k.startswith("model.diffusion_model.") for k in ks):
        return "a full checkpoint or UNet (model.diffusion_model.* keys)"
    if "input_blocks.0.0.weight" in ks and "out.2.weight" in ks:
        return "a bare LDM UNet (input_blocks.*, out.* keys)"
    if any(k.startswith("first_stage_model.") or k.startswith("encoder.down") for k in ks):
        return "a VAE"
    if any("lora" in k for k in ks):
        return "a LoRA"
    return f"{len(ks)} tensors such as {sorted(ks)[:3]}"


def check_controlnet_file(path, expected_base: str = "") -> dict:
    """Validate that `path` holds a ControlNet (cldm or diffusers layout) and, when `expected_base`
    is given, that a JDM export was trained for that base; returns its metadata (may be empty)."""
    keys = _keys(path)
    if not (any(k in keys for k in _CLDM_KEYS) or _DIFFUSERS_KEY in keys or "lora_controlnet" in keys):
        raise ValueError(f"control_net_name: {path} is not a ControlNet: found {_what(keys)}; expected "
                         f"ControlNet keys (zero_convs.* / control_model.zero_convs.* or {_DIFFUSERS_KEY})")
    meta = model_io.read_metadata(path) if str(path).lower().endswith(".safetensors") else {}
    base = str(meta.get("jdm.base", ""))
    if expected_base and base and base != expected_base:
        raise ValueError(f"control_net_name: {path} is a JDM ControlNet trained for base {base!r}, "
                         f"but expected_base is {expected_base!r}; load the ControlNet exported with that student")
    return meta


def warn_if_mixed_export(path, meta: dict) -> str | None:
    """Log (and return) a warning when the JDM student exported with this ControlNet is in the
    model folders but belongs to another export (a run interrupted while exporting)."""
    try:
        members = json.loads(str(meta.get("jdm.export_set", "") or "{}"))
    except ValueError:
        return None
    student = Path(str(members.get("student", "") or "")).name if isinstance(members, dict) else ""
    if not student:
        return None
    student_path = folder_paths.get_full_path("diffusion_models", student)
    if student_path is None and (Path(path).parent / student).is_file():  # exports in one output folder
        student_path = Path(path).parent / student
    if student_path is None:
        return None
    try:
        problem = model_io.export_set_mismatch({"controlnet": path, "student": student_path})
    except ValueError:  # an unreadable student is the student loader's error to report
        return None
    if problem:
        problem = (f"control_net_name: {problem}; the two files come from different exports (a run stopped while "
                   f"exporting?): export again, or load the student written with this ControlNet")
        log.warning("%s", problem)
    return problem


def _timestep(meta: dict) -> int:
    raw = str(meta.get("jdm.timestep", "") or "")
    try:
        return int(raw) if raw else DEFAULT_GENERATOR_TIMESTEP
    except ValueError:
        raise ValueError(f"control_net_name: jdm.timestep metadata {raw!r} is not an integer") from None


class ControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JDM_ControlNetLoader",
            display_name="JDM ControlNet Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a JDM ControlNet export (models/controlnet/<output>_<control>.safetensors) or a plain "
                        "LDM / diffusers ControlNet; outputs the control it was trained for and the generator timestep.",
            inputs=[
                io.Combo.Input("control_net_name", options=folder_paths.get_filename_list("controlnet"),
                               tooltip="File in models/controlnet."),
                io.String.Input("expected_base", default="", optional=True,
                                tooltip="If set, refuse a JDM ControlNet whose jdm.base differs (the base the student "
                                        "was distilled from). Empty: no check."),
            ],
            outputs=[
                io.ControlNet.Output(display_name="CONTROL_NET"),
                io.String.Output(display_name="control", tooltip="jdm.control of the file ('' for a plain ControlNet)."),
                io.Int.Output(display_name="timestep", tooltip="jdm.timestep of the file (999 if absent)."),
            ],
        )

    @classmethod
    def execute(cls, control_net_name, expected_base="") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("controlnet", control_net_name)
        meta = check_controlnet_file(path, expected_base or "")
        warn_if_mixed_export(path, meta)
        controlnet = comfy.controlnet.load_controlnet(path)
        if controlnet is None:
            raise ValueError(f"control_net_name: ComfyUI could not build a ControlNet from {path}")
        control = str(meta.get("jdm.control", "") or "")
        setattr(controlnet, CONTROL_ATTR, control)
        return io.NodeOutput(controlnet, control, _timestep(meta))


def apply_controlnet(positive, control_net, image, strength: float, image_control: str = "", vae=None):
    """`positive` with `control_net` attached (as core ControlNetApplyAdvanced does for one list)."""
    check_conditioning(positive, "positive")
    check_image(image, "image")
    trained = getattr(control_net, CONTROL_ATTR, "")
    if image_control and trained and image_control != trained:
        raise ValueError(f"image: the control image was made for {image_control!r} but the ControlNet was trained "
                         f"for {trained!r}; use the JDM {trained} preprocessor or the {image_control} ControlNet")
    if strength == 0:
        return positive
    hint = image[..., :3].movedim(-1, 1)
    out, made = [], {}
    for emb, opts in positive:
        d = opts.copy()
        prev = d.get("control", None)
        if prev not in made:
            c = control_net.copy().set_cond_hint(hint, strength, (0.0, 1.0), vae=vae)
            c.set_previous_controlnet(prev)
            made[prev] = c
        d["control"] = made[prev]
        d["control_apply_to_uncond"] = False
        out.append([emb, d])
    return out


class ApplyControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JDM_ApplyControlNet",
            display_name="JDM Apply ControlNet",
            category=f"{CATEGORY}/conditioning",
            description="Attaches a (JDM) ControlNet and its control image to the positive conditioning of the "
                        "one-step student; refuses an image made for another control.",
            inputs=[
                io.Conditioning.Input("positive"),
                io.ControlNet.Input("control_net"),
                io.Image.Input("image", tooltip="The control image (from a JDM preprocessor)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.String.Input("image_control", default="", optional=True, force_input=True,
                                tooltip="Which control the image is (the preprocessor's 'control' output)."),
                io.Vae.Input("vae", optional=True),
            ],
            outputs=[io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def execute(cls, positive, control_net, image, strength, image_control="", vae=None) -> io.NodeOutput:
        return io.NodeOutput(apply_controlnet(positive, control_net, image, strength, image_control or "", vae))
