"""ComfyUI workflow files without ComfyUI: build (UI format 0.4), check, and convert to API format.

Pure Python (no `comfy` import), so CI can check the shipped workflows against the schemas of
`tools.schemas`, and tests can turn
them into the API prompts `POST /prompt` runs. The frontend is what normally converts UI to
API format; `to_api` follows its rules: widget values fill the widget inputs in
`input_order` (required, then optional), an INT with `control_after_generate` is followed by
its control value ("fixed", "randomize", ...), an `image_upload` combo by its upload value,
and a widget input that has a link takes the link.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
NOTE_TYPES = {"Note", "MarkdownNote"}


def input_specs(node_info: dict) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, optional) of every input in `input_order`."""
    out = []
    for group in ("required", "optional"):
        specs = node_info["input"].get(group, {})
        for name in node_info.get("input_order", {}).get(group, list(specs)):
            spec = specs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, spec[0], opts, group == "optional"))
    return out


def is_widget(typ: Any, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def combo_options(typ: Any, opts: dict) -> list | None:
    if isinstance(typ, list):
        return typ
    if typ == "COMBO":
        return opts.get("options", [])
    return None


def widget_slots(node_info: dict) -> list[tuple[str | None, Any, dict]]:
    """The widgets_values layout: (input name or None for an extra UI widget, type, options)."""
    slots: list[tuple[str | None, Any, dict]] = []
    for name, typ, opts, _ in input_specs(node_info):
        if not is_widget(typ, opts):
            continue
        slots.append((name, typ, opts))
        if typ == "INT" and opts.get("control_after_generate"):
            slots.append((None, "control_after_generate", {}))
        if opts.get("image_upload"):
            slots.append((None, "upload", {}))
    return slots


def _links(workflow: dict) -> dict[int, list]:
    return {link[0]: link for link in workflow.get("links", [])}


def to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """UI-format workflow (0.4) -> API prompt {id: {"class_type", "inputs"}}; notes and muted/bypassed nodes are dropped."""
    links = _links(workflow)
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] not in object_info:
            raise ValueError(f"node {node['id']}: unknown node type {node['type']!r}")
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        slots = widget_slots(info)
        if len(values) != len(slots):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                             f"{len(slots)} widgets {[s[0] or s[1] for s in slots]}")
        widget_value = {name: v for (name, _, _), v in zip(slots, values) if name is not None}
        inputs: dict[str, Any] = {}
        for name, typ, opts, optional in input_specs(info):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
            elif name in widget_value:
                inputs[name] = widget_value[name]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", info.get("display_name", node["type"]))}}
    return prompt


def _fits(name: str, typ: Any, opts: dict, value: Any) -> str | None:
    options = combo_options(typ, opts)
    if options is not None:
        if options and value not in options:
            return f"{name}={value!r} is not one of {options[:8]}"
        return None
    if typ == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name}={value!r} is not an integer"
    elif typ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}={value!r} is not a number"
    elif typ == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    elif typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    elif typ == "control_after_generate":
        return None if value in CONTROL_VALUES else f"control_after_generate value {value!r} not in {sorted(CONTROL_VALUES)}"
    elif typ == "upload":
        return None
    if typ in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{name}={value} is outside [{lo}, {hi}]"
    return None


def _types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems of a UI-format workflow against object_info (empty list: fine)."""
    errors: list[str] = []
    if workflow.get("version") != 0.4:
        errors.append(f"version is {workflow.get('version')!r}; expected 0.4")
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links(workflow)
    if workflow.get("last_node_id") != max(nodes, default=0):
        errors.append(f"last_node_id {workflow.get('last_node_id')} != max node id {max(nodes, default=0)}")
    if workflow.get("last_link_id") != max(links, default=0):
        errors.append(f"last_link_id {workflow.get('last_link_id')} != max link id {max(links, default=0)}")
    for node in nodes.values():
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in NOTE_TYPES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            errors.append(f"{where}: unknown node type")
            continue
        specs = {name: (typ, opts, optional) for name, typ, opts, optional in input_specs(info)}
        for i in node.get("inputs", []):
            if i["name"] not in specs:
                errors.append(f"{where}: input {i['name']!r} does not exist")
        for name, (typ, opts, optional) in specs.items():
            entry = next((i for i in node.get("inputs", []) if i["name"] == name), None)
            if not optional and not is_widget(typ, opts) and (entry is None or entry.get("link") is None):
                errors.append(f"{where}: required input {name!r} is not connected")
        slots = widget_slots(info)
        values = node.get("widgets_values") or []
        if len(values) != len(slots):
            errors.append(f"{where}: {len(values)} widget values for {len(slots)} widgets")
        else:
            for (name, typ, opts), value in zip(slots, values):
                problem = _fits(name or typ, typ, opts, value)
                if problem:
                    errors.append(f"{where}: {problem}")
        outputs = info.get("output", [])
        for slot, out in enumerate(node.get("outputs", [])):
            if slot >= len(outputs) or out["type"] != outputs[slot]:
                expected = outputs[slot] if slot < len(outputs) else None
                errors.append(f"{where}: output {slot} type {out['type']!r} != {expected!r}")
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1] != node["id"] or links[lid][2] != slot:
                    errors.append(f"{where}: output {slot} lists link {lid} that does not start here")
    for lid, (_, src, src_slot, dst, dst_slot, typ) in links.items():
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid}: missing node {src if src not in nodes else dst}")
            continue
        src_info, dst_node = object_info.get(nodes[src]["type"]), nodes[dst]
        out_type = src_info["output"][src_slot] if src_info and src_slot < len(src_info["output"]) else None
        if dst_slot >= len(dst_node.get("inputs", [])):
            errors.append(f"link {lid}: target slot {dst_slot} of node {dst} does not exist")
            continue
        entry = dst_node["inputs"][dst_slot]
        if entry.get("link") != lid:
            errors.append(f"link {lid}: node {dst} input {entry['name']!r} does not point back to it")
        dst_info = object_info.get(dst_node["type"])
        in_spec = dict((n, (t, o)) for n, t, o, _ in input_specs(dst_info)).get(entry["name"]) if dst_info else None
        in_type = "COMBO" if in_spec and isinstance(in_spec[0], list) else (in_spec[0] if in_spec else None)
        for what, t in (("source output", out_type), ("target input", in_type), ("input entry", entry.get("type"))):
            if t is None or not _types_match(typ, t):
                errors.append(f"link {lid}: type {typ!r} does not match the {what} type {t!r}")
    return errors


class Graph:
    """Builds a UI-format (0.4) workflow the way the frontend saves it."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, type_: str, pos: tuple[float, float], widgets: dict | None = None, title: str | None = None,
             size: tuple[float, float] | None = None, **links: tuple[dict, int]) -> dict:
        """Add a node; `widgets` by input name (control values as "<name>:control"), `links` as name=(node, slot)."""
        info = self.info[type_]
        widgets = dict(widgets or {})
        inputs = []
        for name, typ, opts, _ in input_specs(info):
            if not is_widget(typ, opts) or name in links:
                entry = {"name": name, "type": "COMBO" if isinstance(typ, list) else typ, "link": None}
                if is_widget(typ, opts):
                    entry["widget"] = {"name": name}
                if info["input"].get("optional", {}).get(name) is not None and not is_widget(typ, opts):
                    entry["shape"] = 7
                inputs.append(entry)
        values = []
        prev_name = None
        for name, typ, opts in widget_slots(info):
            if name is None:  # the extra UI widget after `prev_name` ("seed:control_after_generate")
                values.append(widgets.pop(f"{prev_name}:{typ}", "fixed" if typ == "control_after_generate" else "image"))
                continue
            prev_name = name
            if name in widgets:
                values.append(widgets.pop(name))
            elif "default" in opts:
                values.append(opts["default"])
            else:
                opts_list = combo_options(typ, opts)
                values.append(opts_list[0] if opts_list else "")
        unknown = list(widgets)
        if unknown:
            raise ValueError(f"{type_}: no widgets named {unknown}")
        size = size or (315, 40 + 22 * (len(values) + max(len(inputs), len(info["output"]))))
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size),
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": inputs,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(zip(info.get("output_name", info["output"]), info["output"]))],
                "properties": {"Node name for S&R": type_}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        for name, (src, slot) in links.items():
            self.connect(src, slot, node, name)
        return node

    def connect(self, src: dict, slot: int, dst: dict, name: str) -> None:
        lid = len(self.links) + 1
        typ = src["outputs"][slot]["type"]
        entry = next(i for i in dst["inputs"] if i["name"] == name)
        entry["link"] = lid
        src["outputs"][slot]["links"].append(lid)
        self.links.append([lid, src["id"], slot, dst["id"], dst["inputs"].index(entry), typ])

    def group(self, title: str, bounding: tuple[float, float, float, float], color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "bounding": list(bounding), "color": color, "font_size": 24, "flags": {}})

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
