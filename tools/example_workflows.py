"""The pack's example workflows (``example_workflows/*.json``, UI format 0.4) and their thumbnails.

`python -m tools.example_workflows` rewrites them from the node schemas of `tools.schemas`
(the core nodes' and this pack's). Model names are the trainer's default
exports (``--output jdm``): ``models/unet/jdm.safetensors`` and
``models/controlnet/jdm_<control>.safetensors``; the teacher is SD1.5's usual file name.
Pure Python: no ComfyUI needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tools import workflow_format as wf
from tools import schemas

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"

TEACHER = "v1-5-pruned-emaonly.safetensors"
GUIDANCE_TEACHER = "v2-1_512-ema-pruned.safetensors"
STUDENT = "jdm.safetensors"
TEACHER_CANNY_CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
PROMPT = "a photograph of a cozy living room with a sofa and a lamp, warm light, detailed"
NEGATIVE = "blurry, low quality, deformed"


def student_graph(control: str, preprocessor: str, pre_widgets: dict, title: str, scale_input: bool = False):
    """image -> JDM preprocessor -> JDM ControlNet Loader -> JDM Apply ControlNet -> JDM One-Step Sampler -> decode."""
    g = wf.Graph(schemas.load())
    ckpt = g.node("CheckpointLoaderSimple", (20, 80), {"ckpt_name": TEACHER}, title="Teacher checkpoint (CLIP + VAE)")
    unet = g.node("UNETLoader", (20, 240), {"unet_name": STUDENT, "weight_dtype": "default"},
                  title="JDM student (models/unet)")
    text = g.node("CLIPTextEncode", (380, 80), {"text": PROMPT}, clip=(ckpt, 1), size=(400, 180))
    image = g.node("LoadImage", (20, 380), {"image": "example.png"}, size=(315, 320))
    src = image
    if scale_input:
        src = g.node("ImageScale", (20, 740), {"upscale_method": "nearest-exact", "width": 512, "height": 512,
                                               "crop": "center"}, title="Show the small image at 512 px",
                     image=(image, 0))
    pre = g.node(preprocessor, (380, 490), pre_widgets, image=(src, 0))
    cn = g.node("JDM_ControlNetLoader", (380, 300), {"control_net_name": f"jdm_{control}.safetensors"})
    apply = g.node("JDM_ApplyControlNet", (820, 80), {"strength": 1.0}, positive=(text, 0), control_net=(cn, 0),
                   image=(pre, 0), image_control=(pre, 1))
    latent = g.node("EmptyLatentImage", (820, 290), {"width": 512, "height": 512, "batch_size": 1})
    sampler = g.node("JDM_OneStepSampler", (1180, 80), {"seed": 0, "timestep": 999}, model=(unet, 0),
                     positive=(apply, 0), latent_image=(latent, 0), timestep=(cn, 2))
    decode = g.node("VAEDecode", (1520, 80), samples=(sampler, 0), vae=(ckpt, 2))
    g.node("PreviewImage", (1520, 200), title=f"One-step result ({title})", images=(decode, 0), size=(400, 420))
    g.node("PreviewImage", (820, 460), title=f"{control} control image", images=(pre, 0), size=(320, 340))
    return g.workflow()


def decoupled_cfg_graph():
    g = wf.Graph(schemas.load())
    a = g.node("CheckpointLoaderSimple", (20, 80), {"ckpt_name": TEACHER}, title="Fidelity teacher A (SD1.5)")
    b = g.node("CheckpointLoaderSimple", (20, 380), {"ckpt_name": GUIDANCE_TEACHER}, title="Guidance teacher B")
    pos_a = g.node("CLIPTextEncode", (380, 40), {"text": PROMPT}, title="Prompt (A's CLIP)", clip=(a, 1), size=(400, 160))
    pos_b = g.node("CLIPTextEncode", (380, 260), {"text": PROMPT}, title="Prompt (B's CLIP)", clip=(b, 1), size=(400, 160))
    neg_b = g.node("CLIPTextEncode", (380, 480), {"text": NEGATIVE}, title="Negative (B's CLIP)", clip=(b, 1),
                   size=(400, 160))
    guider = g.node("JDM_DecoupledCFGGuider", (840, 40), {"cfg": 7.5}, model=(a, 0), positive=(pos_a, 0),
                    negative=(neg_b, 0), model_b=(b, 0), positive_b=(pos_b, 0))
    noise = g.node("RandomNoise", (840, 280), {"noise_seed": 0})
    sampler = g.node("KSamplerSelect", (840, 420), {"sampler_name": "euler"})
    sigmas = g.node("BasicScheduler", (840, 540), {"scheduler": "normal", "steps": 20, "denoise": 1.0}, model=(a, 0))
    latent = g.node("EmptyLatentImage", (840, 720), {"width": 512, "height": 512, "batch_size": 1})
    out = g.node("SamplerCustomAdvanced", (1200, 40), noise=(noise, 0), guider=(guider, 0), sampler=(sampler, 0),
                 sigmas=(sigmas, 0), latent_image=(latent, 0))
    decode = g.node("VAEDecode", (1540, 40), samples=(out, 0), vae=(a, 2))
    g.node("PreviewImage", (1540, 180), title="Decoupled-CFG teacher preview", images=(decode, 0), size=(400, 420))
    return g.workflow()


def one_step_vs_teacher_graph():
    g = wf.Graph(schemas.load())
    ckpt = g.node("CheckpointLoaderSimple", (20, 80), {"ckpt_name": TEACHER}, title="Teacher (SD1.5)")
    pos = g.node("CLIPTextEncode", (380, 40), {"text": PROMPT}, clip=(ckpt, 1), size=(400, 160))
    neg = g.node("CLIPTextEncode", (380, 240), {"text": NEGATIVE}, title="Negative", clip=(ckpt, 1), size=(400, 160))
    image = g.node("LoadImage", (20, 300), {"image": "example.png"}, size=(315, 320))
    canny = g.node("JDM_CannyPreprocessor", (20, 680), {"low_threshold": 100, "high_threshold": 200}, image=(image, 0))
    latent = g.node("EmptyLatentImage", (380, 440), {"width": 512, "height": 512, "batch_size": 1})
    # one step: the JDM student with its ControlNet
    unet = g.node("UNETLoader", (840, 40), {"unet_name": STUDENT, "weight_dtype": "default"}, title="JDM student")
    jcn = g.node("JDM_ControlNetLoader", (840, 180), {"control_net_name": "jdm_canny.safetensors"})
    japply = g.node("JDM_ApplyControlNet", (840, 340), {"strength": 1.0}, positive=(pos, 0), control_net=(jcn, 0),
                    image=(canny, 0), image_control=(canny, 1))
    one = g.node("JDM_OneStepSampler", (1200, 40), {"seed": 0, "timestep": 999}, model=(unet, 0),
                 positive=(japply, 0), latent_image=(latent, 0), timestep=(jcn, 2))
    dec1 = g.node("VAEDecode", (1540, 40), samples=(one, 0), vae=(ckpt, 2))
    g.node("PreviewImage", (1780, 40), title="One step (JDM student)", images=(dec1, 0), size=(380, 400))
    # 20 steps: the teacher with a standard canny ControlNet
    tcn = g.node("ControlNetLoader", (840, 620), {"control_net_name": TEACHER_CANNY_CONTROLNET})
    tapply = g.node("ControlNetApplyAdvanced", (840, 740), {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
                    positive=(pos, 0), negative=(neg, 0), control_net=(tcn, 0), image=(canny, 0))
    ks = g.node("KSampler", (1200, 620), {"seed": 0, "steps": 20, "cfg": 7.5, "sampler_name": "euler",
                                          "scheduler": "normal", "denoise": 1.0},
                model=(ckpt, 0), positive=(tapply, 0), negative=(tapply, 1), latent_image=(latent, 0))
    dec2 = g.node("VAEDecode", (1540, 620), samples=(ks, 0), vae=(ckpt, 2))
    g.node("PreviewImage", (1780, 620), title="Teacher, 20 steps + ControlNet", images=(dec2, 0), size=(380, 400))
    g.group("One step: JDM student + JDM ControlNet (1 UNet evaluation)", (820, -30, 1380, 570))
    g.group("Teacher: 20 steps, cfg 7.5, + canny ControlNet (40 UNet evaluations)", (820, 580, 1380, 440), "#8a6d3b")
    return g.workflow()


def workflows() -> dict[str, dict]:
    """name -> UI-format workflow."""
    return {
        "jdm_one_step_hed": student_graph("hed", "JDM_HEDPreprocessor", {"safe": False}, "HED"),
        "jdm_one_step_canny": student_graph("canny", "JDM_CannyPreprocessor",
                                            {"low_threshold": 100, "high_threshold": 200}, "canny"),
        "jdm_one_step_lowres_upscale": student_graph("lowres", "JDM_LowResPreprocessor", {"factor": 8},
                                                     "8x upscaling", scale_input=True),
        "jdm_decoupled_cfg_teacher": decoupled_cfg_graph(),
        "jdm_one_step_vs_teacher_20_steps": one_step_vs_teacher_graph(),
    }


TYPE_COLORS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931", "LATENT": "#ff9cf9",
               "IMAGE": "#64b5f6", "CONTROL_NET": "#00d78d", "INT": "#aaaaaa", "STRING": "#aaaaaa",
               "GUIDER": "#66ffff", "NOISE": "#b0b0b0", "SAMPLER": "#ecb4b4", "SIGMAS": "#cdffcd"}


def control_example(control: str):
    """(photo, control image) as PIL images: a CC0 scikit-image photo through jdm_train's extractor."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from jdm_train import extractors

    photo = Image.fromarray(data.chelsea()).resize((256, 192))
    x = torch.from_numpy(np.asarray(photo)).float().div(255).movedim(-1, 0)[None]
    params = {"canny": {"low_threshold": 100, "high_threshold": 200}, "lowres": {"factor": 8}}[control]
    c = extractors.run_extractor(control, x, **params)[0].movedim(0, -1).mul(255).round().byte().numpy()
    return photo, Image.fromarray(c)


def thumbnail(graph: dict, title: str, insets=()):
    """A schematic of the workflow (nodes, typed links, groups) with optional real example images."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = 768, 512
    img = Image.new("RGB", (W, H), "#202020")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    nodes = {n["id"]: n for n in graph["nodes"]}
    xs = [n["pos"][0] for n in nodes.values()] + [n["pos"][0] + n["size"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()] + [n["pos"][1] + n["size"][1] for n in nodes.values()]
    for gr in graph["groups"]:
        x, y, w, h = gr["bounding"]
        xs += [x, x + w]
        ys += [y, y + h]
    top = 40 + (170 if insets else 0)
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    s = min((W - 20) / (x1 - x0), (H - top - 10) / (y1 - y0))

    def P(x, y):
        return 10 + (x - x0) * s, top + (y - y0) * s

    for gr in graph["groups"]:
        x, y, w, h = gr["bounding"]
        d.rectangle([*P(x, y), *P(x + w, y + h)], outline=gr["color"], width=2)
        d.text((P(x, y)[0] + 4, P(x, y)[1] + 2), gr["title"][:60], fill=gr["color"], font=font)
    for lid, src, ss, dst, ds, typ in graph["links"]:
        a, b = nodes[src], nodes[dst]
        p0 = P(a["pos"][0] + a["size"][0], a["pos"][1] + 20 + 18 * ss)
        p1 = P(b["pos"][0], b["pos"][1] + 20 + 18 * ds)
        d.line([p0, p1], fill=TYPE_COLORS.get(typ, "#888888"), width=2)
    for n in nodes.values():
        x, y = n["pos"]
        w, h = n["size"]
        jdm = n["type"].startswith("JDM_")
        d.rounded_rectangle([*P(x, y), *P(x + w, y + h)], radius=4, fill="#353535",
                            outline="#7fd1ff" if jdm else "#666666", width=2 if jdm else 1)
        label = n.get("title") or n["type"]
        d.text((P(x, y)[0] + 3, P(x, y)[1] + 3), label[: max(6, int(w * s / 6))], fill="#ffffff" if jdm else "#cccccc",
               font=font)
    d.text((10, 10), title, fill="#ffffff", font=font)
    d.text((10, 24), "ComfyUI-JDM example workflow (JDM nodes outlined in blue)", fill="#aaaaaa", font=font)
    x = 10
    for label, im in insets:
        im = im.copy()
        im.thumbnail((230, 150))
        img.paste(im, (x, 50))
        d.text((x, 50 + im.height + 2), label, fill="#dddddd", font=font)
        x += im.width + 20
    return img


TITLES = {
    "jdm_one_step_hed": "One-step HED control: image -> JDM HED -> JDM ControlNet -> JDM One-Step Sampler",
    "jdm_one_step_canny": "One-step canny control: image -> JDM Canny -> JDM ControlNet -> JDM One-Step Sampler",
    "jdm_one_step_lowres_upscale": "One-step 8x upscaling: small image -> nearest 512 px -> JDM LowRes -> one step",
    "jdm_decoupled_cfg_teacher": "Decoupled-CFG teacher preview: x0_A(pos) + (cfg-1)(x0_B(pos) - x0_B(neg))",
    "jdm_one_step_vs_teacher_20_steps": "One step (JDM student) vs teacher 20 steps + ControlNet, same canny image",
}


def main() -> int:
    WORKFLOWS.mkdir(exist_ok=True)
    for name, graph in workflows().items():
        problems = wf.check_workflow(graph, schemas.load())
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(graph, indent=2) + "\n")
        insets = []
        control = {"jdm_one_step_canny": "canny", "jdm_one_step_lowres_upscale": "lowres",
                   "jdm_one_step_vs_teacher_20_steps": "canny"}.get(name)
        if control:
            photo, cond = control_example(control)
            insets = [("photo (scikit-image, CC0)", photo), (f"JDM {control} preprocessor output", cond)]
        thumbnail(graph, TITLES[name], insets).save(WORKFLOWS / f"{name}.jpg", quality=88)
        print(f"wrote example_workflows/{name}.json and .jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
