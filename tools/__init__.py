"""Development tools of the checkout: not shipped; `nodes/` and the core `jdm_train/` never import them
(the benchmark `python -m jdm_train.bench comfy` uses the harness).

* `comfyui`: the ComfyUI test harness (in-process `import_comfyui`, a real `ComfyServer`).
* `schemas`: the node schemas the workflows are checked against (`object_info.json`, this pack's
  `GET /object_info`; `core_object_info.json`, the core nodes the workflows use);
  `python -m tools.schemas` rewrites the pack's snapshot from a live ComfyUI.
* `workflow_format`: ComfyUI workflow files without ComfyUI (build, check, convert to API format).
* `example_workflows`: `python -m tools.example_workflows` rewrites `example_workflows/`.

Run from the repository root (pytest puts it on `sys.path`; `python -m` does too).
"""
