"""The pack's entry point (root __init__.py) outside ComfyUI, and the node modules' import rules."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_root_init_imports_without_comfyui_and_defines_no_v1_mappings():
    if importlib.util.find_spec("comfy_api") is not None:
        pytest.skip("comfy_api is importable here (a ComfyUI environment)")
    spec = importlib.util.spec_from_file_location("ComfyUI_JDM_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_JDM_pack"] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("ComfyUI_JDM_pack", None)
    # ComfyUI ignores comfy_entrypoint when NODE_CLASS_MAPPINGS exists at all
    assert not hasattr(mod, "NODE_CLASS_MAPPINGS")
    assert not hasattr(mod, "comfy_entrypoint")  # only inside ComfyUI


NODE_MODULES = sorted((REPO / "nodes").glob("*.py"))


@pytest.mark.parametrize("path", NODE_MODULES + [REPO / "__init__.py"], ids=lambda p: p.name)
def test_node_modules_import_the_pack_relatively(path):
    """ComfyUI does not put the pack on sys.path: `import jdm_train` would fail in a user's install."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(not a.name.startswith(("jdm_train", "nodes")) for a in node.names), ast.dump(node)
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            assert not (node.module or "").startswith(("jdm_train", "nodes")), f"{path.name}: from {node.module}"
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assert not any(isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in targets)


def test_core_jdm_train_modules_used_by_nodes_import_relatively():
    """What the nodes import from jdm_train must load as `<pack>.jdm_train` too (no absolute jdm_train imports)."""
    used = [REPO / "jdm_train" / f for f in ("sampling.py", "guidance.py", "model_io.py", "files.py", "ldm_convert.py",
                                             "schedule.py")]
    used += sorted((REPO / "jdm_train" / "extractors").glob("*.py"))
    for path in used:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("jdm_train"), f"{path.name}: from {node.module}"
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("jdm_train") for a in node.names), path.name
