"""What the registry and pip read: licence, icon, dependencies, and what `comfy node pack` leaves out.

Runtime dependencies are what the runtime imports: the imports of jdm_train/ and nodes/
(the benchmarks and tools/ are developer tools, covered by the test extra, and the runtime never
imports them)
map one to one onto pyproject's dependencies, and requirements.txt (what ComfyUI-Manager
installs) lists the same minus torch.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]

# Modules ComfyUI provides to the nodes; never dependencies of the pack.
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "latent_preview", "node_helpers", "nodes",
                   "server", "utils"}
DISTRIBUTION = {"cv2": "opencv-python-headless", "PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image"}
# Declared for a file, not an import: model_io reads openai-clip's BPE vocabulary without importing clip.
DATA_ONLY = {"openai-clip"}
DEV_TOOLS = ("jdm_train/bench/", "tools/")


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def imported_distributions(paths: list[Path]) -> dict[str, set[str]]:
    """Third-party distribution -> files importing it (absolute imports only; the pack imports itself relatively)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in COMFYUI_MODULES or top in ("jdm_train", "tools"):
                    continue
                found.setdefault(DISTRIBUTION.get(top, top).lower(), set()).add(str(path.relative_to(REPO)))
    return found


def pack_sources() -> tuple[list[Path], list[Path]]:
    files = [REPO / "__init__.py", *sorted((REPO / "jdm_train").rglob("*.py")), *sorted((REPO / "nodes").rglob("*.py")),
             *sorted((REPO / "tools").rglob("*.py"))]
    dev = [p for p in files if str(p.relative_to(REPO)).startswith(DEV_TOOLS)]
    return [p for p in files if p not in dev], dev


def test_runtime_dependencies_are_what_the_runtime_imports():
    runtime, dev = pack_sources()
    declared = {requirement_name(r) for r in PROJECT["dependencies"]}
    imported = imported_distributions(runtime)
    assert set(imported) | DATA_ONLY == declared, {
        "imported, not declared": {d: sorted(f) for d, f in imported.items() if d not in declared},
        "declared, not imported": sorted(declared - set(imported) - DATA_ONLY),
    }
    # the developer tools need nothing beyond the runtime and the test extra
    test_extra = {requirement_name(r) for r in PROJECT["optional-dependencies"]["test"]}
    assert set(imported_distributions(dev)) <= declared | test_extra
    assert "einops" not in declared  # imported nowhere


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports, relative imports resolved against its place in the checkout."""
    package = list(path.relative_to(REPO).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def test_the_runtime_never_imports_the_development_tools():
    """nodes/ and the core jdm_train/ stand alone: the benchmarks and tools/ build on them, never the reverse."""
    runtime, _ = pack_sources()
    for path in runtime:
        dev = {m for m in imported_modules(path) if m.startswith(("jdm_train.bench", "tools"))}
        assert not dev, f"{path.relative_to(REPO)} imports {sorted(dev)}"


def test_the_tools_are_not_installed():
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["jdm_train*"]


def test_requirements_txt_is_pyproject_without_torch():
    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert sorted(reqs) == sorted(r for r in PROJECT["dependencies"] if requirement_name(r) != "torch")
    torch_req = [r for r in PROJECT["dependencies"] if requirement_name(r) == "torch"]
    assert torch_req == ["torch>=2.1"]  # a floor only: pip keeps the CUDA build ComfyUI users have


def test_license_is_the_apache_2_text():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and "http://www.apache.org/licenses/LICENSE-2.0" in text
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]


def test_registry_fields():
    # https://docs.comfy.org/registry/specifications: name, X.Y.Z version, Repository, PublisherId
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", PROJECT["name"]) and len(PROJECT["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])
    assert PROJECT["urls"]["Repository"].startswith("https://github.com/")
    assert COMFY["PublisherId"] and COMFY["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", COMFY["requires-comfyui"])


def test_icon_is_a_url_to_the_committed_icon():
    from PIL import Image

    repo = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert COMFY["Icon"].startswith(prefix)
    path = REPO / COMFY["Icon"].removeprefix(prefix)
    assert path.suffix in (".svg", ".png", ".jpg", ".gif") and path.is_file()
    with Image.open(path) as im:
        assert im.width <= 800 and im.height <= 400


def test_comfy_node_pack_leaves_out_only_development_files():
    """`comfy node pack` zips git's tracked files minus .comfyignore (gitignore patterns, as git reads them)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    left_out = set(out.split())
    assert {"tests/conftest.py", "tools/comfyui.py", "tools/object_info.json", "icon.png", ".ci/run",
            "jdm_train/demo/samples/main_job_eval.json"} <= left_out
    runtime, _ = pack_sources()
    needed = {str(p.relative_to(REPO)) for p in runtime} | {"pyproject.toml", "requirements.txt", "LICENSE"}
    needed |= {str(p.relative_to(REPO)) for p in (REPO / "example_workflows").iterdir()}
    needed |= {str(p.relative_to(REPO)) for p in (REPO / "jdm_train" / "demo" / "assets").iterdir()}
    needed |= {str(p.relative_to(REPO)) for p in (REPO / "jdm_train" / "configs").rglob("*") if p.is_file()}
    assert not needed & left_out
