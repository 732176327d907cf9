"""The ComfyUI test harness: a real ComfyUI (``COMFYUI_PATH``) with this pack loaded, on the CPU.

`import_comfyui` imports ComfyUI into this process and loads the pack as ComfyUI does;
`ComfyServer` runs a real `main.py --cpu` on loopback. `pack_object_info` is this pack's part of
`GET /object_info` with the machine-dependent file lists emptied (what `object_info.json` holds).
Nothing here imports ComfyUI at module level.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-JDM"


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
