"""ComfyUI entry point of ComfyUI-JDM.

ComfyUI imports this file as a package (custom_nodes/<pack>/__init__.py); outside
ComfyUI (pip, tests, the trainer) there is no `comfy_api`, and nothing here runs.
"""

try:
    from comfy_api.latest import ComfyExtension  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # not running inside ComfyUI
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = None
