"""How model_io writes weight files: file mode, a full disk, and export sets a kill cannot mix."""

from __future__ import annotations

import errno
import os
import re
from types import SimpleNamespace

import pytest
import torch

from jdm_train import export, fixtures, model_io
from jdm_train.config import TrainConfig




@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_exports_get_the_umask_mode_of_a_plain_open(tmp_path, umask, mask, file_mode):
    umask(mask)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    p = model_io.save_state_dict(tmp_path / "w.safetensors", {"a": torch.zeros(2)}, {})
    assert file_mode(p) == file_mode(plain) == 0o666 & ~mask
    with model_io.ExportSet({"student": tmp_path / "s.safetensors", "controlnet": tmp_path / "c.safetensors"}) as ex:
        ex.write("student", {"a": torch.zeros(2)}, {})
        ex.write("controlnet", {"b": torch.zeros(2)}, {})
    assert {file_mode(p) for p in ex.paths.values()} == {0o666 & ~mask}


def _fail_on_call(monkeypatch, n: int, exc: BaseException):
    """Make the n-th safetensors write (1-based) raise `exc` after writing part of the file."""
    real, calls = model_io.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == n:
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise exc
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(model_io, "save_file", save_file)
    return calls


def test_disk_full_is_a_clear_error_and_removes_the_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "jdm.safetensors"
    model_io.save_state_dict(target, {"a": torch.zeros(2)}, {"v": "old"})
    _fail_on_call(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    big = {"w": torch.zeros(1000, 1000)}  # 4 MB
    with pytest.raises(model_io.NoSpaceError, match=re.escape(f"no space left in {target.parent}, needed about 0.004 GB")):
        model_io.save_state_dict(target, big, {"v": "new"})
    assert os.listdir(target.parent) == ["jdm.safetensors"]
    assert model_io.read_metadata(target)["v"] == "old"


def test_disk_full_reported_by_safetensors_text_is_recognised(tmp_path, monkeypatch):
    # safetensors turns the OS error into its own exception type; only the text says ENOSPC
    from safetensors import SafetensorError

    _fail_on_call(monkeypatch, 1, SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                                  "StorageFull, message: \"No space left on device\" })"))
    with pytest.raises(model_io.NoSpaceError, match="no space left in"):
        model_io.save_state_dict(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {})
    assert os.listdir(tmp_path) == []
    assert model_io.is_disk_full(OSError(errno.ENOSPC, "x")) and not model_io.is_disk_full(OSError(errno.EACCES, "x"))


def _old_set(folder):
    models = folder / "models"  # the layout of exports into a ComfyUI root
    paths = {"student": models / "unet" / "jdm.safetensors", "controlnet": models / "controlnet" / "jdm_canny.safetensors"}
    with model_io.ExportSet(paths) as ex:
        ex.write("student", {"a": torch.zeros(2)}, {"v": "old"})
        ex.write("controlnet", {"b": torch.zeros(2)}, {"v": "old"})
    return paths


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.mark.parametrize("exc", [RuntimeError("killed"), OSError(errno.ENOSPC, "No space left on device")])
def test_failed_second_write_keeps_the_old_set_and_no_temp(tmp_path, monkeypatch, exc):
    paths = _old_set(tmp_path)
    old_id = model_io.read_metadata(paths["student"])["jdm.export_id"]
    _fail_on_call(monkeypatch, 2, exc)
    with pytest.raises(type(exc)), model_io.ExportSet(paths) as ex:
        ex.write("student", {"a": torch.ones(2)}, {"v": "new"})
        ex.write("controlnet", {"b": torch.ones(2)}, {"v": "new"})
    metas = {k: model_io.read_metadata(p) for k, p in paths.items()}
    assert {m["v"] for m in metas.values()} == {"old"}
    assert {m["jdm.export_id"] for m in metas.values()} == {old_id}
    assert model_io.export_set_mismatch(paths) is None
    assert _leftovers(tmp_path) == []


def test_write_exports_with_a_failing_controlnet_write_leaves_the_previous_set(tmp_path, monkeypatch):
    """The trainer's export: a failure while writing the ControlNet leaves the old student beside
    the old ControlNet (no new student next to an old ControlNet) and no temporary file."""
    unet = fixtures.make_unet(seed=0)
    roles = SimpleNamespace(controlnet=fixtures.make_controlnet(unet, seed=1))
    monkeypatch.setattr(export, "merged_student_unet", lambda roles: unet)
    config = TrainConfig(output_dir=str(tmp_path))
    first = export.write_exports(config, roles, "tiny.safetensors", tmp_path)
    assert set(first) == {"student", "controlnet"}
    before = {k: p.read_bytes() for k, p in first.items()}
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)  # a new student
    _fail_on_call(monkeypatch, 2, RuntimeError("killed during the ControlNet export"))
    with pytest.raises(RuntimeError, match="ControlNet export"):
        export.write_exports(config, roles, "tiny.safetensors", tmp_path)
    assert {k: p.read_bytes() for k, p in first.items()} == before
    assert _leftovers(tmp_path) == []
    # the set is recorded in every file, for loaders to check
    assert len({model_io.read_metadata(p)["jdm.export_id"] for p in first.values()}) == 1
    assert model_io.read_metadata(first["controlnet"])["jdm.export_set"] == \
        '{"controlnet": "jdm_canny.safetensors", "student": "jdm.safetensors"}'


def test_kill_between_renames_is_detected_and_finished_at_start_up(tmp_path, monkeypatch):
    paths = _old_set(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(dst) == str(paths["controlnet"]):  # the student is in place, the ControlNet is not: killed
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(model_io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), model_io.ExportSet(paths) as ex:
        ex.write("student", {"a": torch.ones(2)}, {"v": "new"})
        ex.write("controlnet", {"b": torch.ones(2)}, {"v": "new"})
    monkeypatch.setattr(model_io.os, "replace", real)
    assert model_io.read_metadata(paths["student"])["v"] == "new"
    assert model_io.read_metadata(paths["controlnet"])["v"] == "old"
    assert "mixed export set" in model_io.export_set_mismatch(paths)
    # what the trainer runs at start-up finishes the interrupted set
    config = TrainConfig(comfyui_root=str(tmp_path), output="jdm", control="canny")
    assert export.export_paths(config, tmp_path)["controlnet"] == paths["controlnet"]
    export.clean_export_leftovers(config, tmp_path)
    assert {model_io.read_metadata(p)["v"] for p in paths.values()} == {"new"}
    assert model_io.export_set_mismatch(paths) is None
    assert _leftovers(tmp_path) == []


def test_start_up_cleaning_removes_leftover_export_temps_only(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), output="jdm", control="hed")
    paths = export.export_paths(config, tmp_path)
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".jdm.safetensors.abc12345.tmp", tmp_path / ".jdm_hed.safetensors.x1y2z3w4.tmp",
             tmp_path / ".jdm_lora.safetensors.00000000.tmp"]
    keep = [tmp_path / ".other.safetensors.abc12345.tmp", tmp_path / "jdm.safetensors", tmp_path / ".checkpoint-5.tmp"]
    for p in stale + keep:
        p.write_bytes(b"x")
    removed = export.clean_export_leftovers(config, tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert set(paths) == {"student", "controlnet", "lora"}


def test_a_journal_is_only_trusted_for_its_own_files(tmp_path):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("keep")
    src = tmp_path / ".jdm.safetensors.aaaa0000.tmp"
    src.write_bytes(b"x")
    journal = tmp_path / ".jdm.safetensors.export-set.json"
    journal.write_text(f'[["{src}", "{victim}"]]')
    model_io.recover_export_set([tmp_path / "jdm.safetensors"])
    assert victim.read_text() == "keep" and not journal.exists() and not src.exists()
