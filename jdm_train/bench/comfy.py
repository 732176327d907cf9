"""`python -m jdm_train.bench comfy`: the JDM One-Step Sampler vs KSampler 20 steps + ControlNet.

Both run in one ComfyUI process (``COMFYUI_PATH``, loaded in-process on the CPU) on the same
random-weight, full-size SD1.5 UNet and ControlNet (written by `jdm_train.fixtures`), with the
same text conditioning and control image. Only the sampling is timed (the model is loaded
once, a warm-up run first). The latent is small (64x64 px -> 8x8 latent by default) so the
20-step run stays feasible on a shared CPU; the ratio is what the table is about (goal >= 18x:
20 UNet+ControlNet evaluations against one).

The module also holds the harness the ComfyUI tests use: `import_comfyui` (in-process ComfyUI
with the pack loaded) and `ComfyServer` (a real `main.py --cpu` on loopback). Nothing here
imports ComfyUI at module level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-JDM"
OBJECT_INFO = PACK_DIR / "nodes" / "object_info.json"


def load_pack_module(name: str):
    """A pure-Python module of the pack's `nodes/` folder (``workflow_format``, ``example_workflows``)
    loaded by path: `nodes/__init__.py` imports ComfyUI, these files do not."""
    import importlib.util

    key = f"jdm_nodes_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, PACK_DIR / "nodes" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def comfyui_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    return Path(p).resolve() if p else None


def pack_link(base_dir: str | os.PathLike) -> Path:
    """`<base_dir>/custom_nodes/ComfyUI-JDM` -> this checkout (the name a user's install has)."""
    link = Path(base_dir) / "custom_nodes" / PACK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return link


def import_comfyui(root: str | os.PathLike, base_dir: str | os.PathLike | None = None, load_pack: bool = True):
    """Import ComfyUI from `root` into this process on the CPU and return its `nodes` module.

    Loads the built-in extra nodes and (``load_pack``) this pack as ComfyUI does
    (`nodes.load_custom_node` on ``custom_nodes/ComfyUI-JDM``). ``base_dir`` adds
    ``<base_dir>/models/<folder>`` as the default model folders. Idempotent.
    """
    root = str(Path(root).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    # main.py imports these first; later `import utils` would otherwise find comfy/utils.py
    import utils.extra_config  # noqa: F401
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import folder_paths
    import nodes

    if base_dir is not None:
        for folder in ("checkpoints", "unet", "diffusion_models", "controlnet", "vae", "loras"):
            d = Path(base_dir) / "models" / folder
            d.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(folder, str(d), is_default=True)
    if "SamplerCustomAdvanced" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if load_pack and "JDM_OneStepSampler" not in nodes.NODE_CLASS_MAPPINGS:
        link = pack_link(base_dir or tempfile.mkdtemp(prefix="jdm-comfy-"))
        if not asyncio.run(nodes.load_custom_node(str(link), module_parent="custom_nodes")):
            raise RuntimeError(f"ComfyUI could not load the pack from {link}")
        if "JDM_OneStepSampler" not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("the pack loaded but registered no JDM_ nodes (see ComfyUI's log)")
    return nodes


def pack_object_info(nodes_module, prefix: str = "JDM_") -> dict[str, Any]:
    """What `GET /object_info` reports for this pack's nodes (model-file combos emptied)."""
    out = {}
    for name, cls in sorted(nodes_module.NODE_CLASS_MAPPINGS.items()):
        if name.startswith(prefix):
            out[name] = json.loads(json.dumps(cls.GET_NODE_INFO_V1()))
    return empty_file_lists(out)


def annotator_params() -> set[str]:
    """The inputs of the preprocessor nodes that list annotator files (HED's `weights`, depth's
    `model`): the `param` of every extractor's declared ``ANNOTATOR``."""
    from jdm_train.extractors import EXTRACTORS

    return {e.ANNOTATOR.param for e in EXTRACTORS.values() if getattr(e, "ANNOTATOR", None) is not None}


def empty_file_lists(info: dict[str, Any]) -> dict[str, Any]:
    """Empty (in place) the options of combos that list files (they depend on the machine): the
    model loaders' ``*_name`` combos, and the annotator combos of the preprocessor nodes (whose
    default name stays, as ``default``)."""
    annotators = annotator_params()
    for node in info.values():
        preprocessor = str(node.get("category", "")).endswith("/preprocessors")
        for group in node.get("input", {}).values():
            for name, spec in group.items():
                if not (len(spec) > 1 and isinstance(spec[1], dict) and "options" in spec[1]):
                    continue
                if name.endswith("_name") or (preprocessor and name in annotators):
                    spec[1]["options"] = []
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real ComfyUI (`main.py --cpu`) on 127.0.0.1 with ``--base-directory base_dir``, the pack linked in."""

    def __init__(self, root: str | os.PathLike, base_dir: str | os.PathLike, python: str = sys.executable,
                 timeout: float = 240.0):
        self.root, self.base_dir, self.python, self.timeout = Path(root), Path(base_dir), python, timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        pack_link(self.base_dir)
        self.log = open(self.base_dir / "comfyui.log", "wb")
        self.proc = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base_dir), "--disable-auto-launch"],
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}); log: {self.base_dir / 'comfyui.log'}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not answer within {self.timeout} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path}: {e.code} {e.read().decode(errors='replace')}") from None

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue an API-format prompt, wait for it, return its history entry (raises on error)."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "jdm-tests"})["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(entry['status'])[:3000]}")
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish within {timeout} s")


# ----------------------------------------------------------------------------- benchmark


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jdm_train.bench comfy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=20, help="teacher KSampler steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--write-object-info", action="store_true",
                    help=f"instead of timing, write {OBJECT_INFO.relative_to(PACK_DIR)} (the pack's GET /object_info)")
    args = ap.parse_args(argv)
    root = comfyui_path()
    if root is None:
        print("COMFYUI_PATH is not set: nothing to benchmark (point it at a ComfyUI checkout with its requirements "
              "installed; README, Tests and CI)", file=sys.stderr)
        return 2
    if args.write_object_info:
        with tempfile.TemporaryDirectory(prefix="jdm-object-info-") as base:
            info = pack_object_info(import_comfyui(root, base))
        OBJECT_INFO.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        print(f"wrote {OBJECT_INFO} ({len(info)} nodes)")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from jdm_train import fixtures, model_io

    with tempfile.TemporaryDirectory(prefix="jdm-bench-comfy-") as base:
        nodes = import_comfyui(root, base)
        import comfy.controlnet
        import comfy.sd

        from diffusers import UNet2DConditionModel

        cfg = json.loads((model_io.CONFIG_DIR / "sd15_unet_config.json").read_text())
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg).eval()
        unet_path = model_io.save_unet_ldm(Path(base) / "models" / "unet" / "jdm.safetensors", unet,
                                           {"jdm.base": "bench"}, dtype=torch.float16)
        cn_path = model_io.save_controlnet_ldm(Path(base) / "models" / "controlnet" / "jdm_canny.safetensors",
                                               fixtures.make_controlnet(unet, seed=1), {"jdm.control": "canny"},
                                               dtype=torch.float16)
        del unet
        model = comfy.sd.load_diffusion_model(str(unet_path), model_options={"dtype": torch.float32})
        controlnet = comfy.controlnet.load_controlnet(str(cn_path))
        g = torch.Generator().manual_seed(0)
        text = torch.randn(1, 77, 768, generator=g)
        hint = (torch.rand(1, args.size, args.size, 3, generator=g) > 0.5).float()
        positive = [[text, {}]]
        negative = [[torch.zeros_like(text), {}]]
        pos_c, neg_c = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint,
                                                                        1.0, 0.0, 1.0)
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
        one_step = nodes.NODE_CLASS_MAPPINGS["JDM_OneStepSampler"]
        with torch.inference_mode():
            run_one = lambda: one_step.execute(model, pos_c, latent, 0, 999)  # noqa: E731
            run_teacher = lambda: nodes.common_ksampler(model, 0, args.steps, 7.5, "euler", "normal",  # noqa: E731
                                                        pos_c, neg_c, latent)
            run_one()
            t_one = _timed(run_one, args.repeats)
            run_teacher()
            t_teacher = _timed(run_teacher, max(1, args.repeats - 1))
    print(f"ComfyUI {root}, full-size SD1.5 UNet + ControlNet (random weights, fp32 on CPU, "
          f"{torch.get_num_threads()} threads), latent {args.size // 8}x{args.size // 8} ({args.size} px), batch 1")
    print("| sampler | UNet+ControlNet forward passes | best time (s) | ratio |")
    print("|---|---|---|---|")
    print(f"| JDM One-Step Sampler (t=999) | 1 | {t_one:.3f} | 1.0x |")
    print(f"| KSampler euler/normal {args.steps} steps, cfg 7.5 + ControlNet | {args.steps} (batch 2: cond+uncond) | "
          f"{t_teacher:.3f} | {t_teacher / t_one:.1f}x |")
    print(f"speed-up of the one-step node: {t_teacher / t_one:.1f}x (goal >= 18x)")
    return 0
