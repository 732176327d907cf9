"""`python -m jdm_train.bench gpu` at tiny size on the CPU, so the script a GPU session runs cannot rot."""

import gc
import json
import math

import pytest
import torch

from jdm_train.bench import __main__ as bench
from jdm_train.bench import gpu


def test_tiny_cpu_run_prints_the_table_and_writes_the_json(tmp_path, capsys):
    path = tmp_path / "out" / "gpu.json"
    assert gpu.main(["--device", "cpu", "--tiny", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["complete"] and report["errors"] == []
    assert report["environment"]["device"] == "cpu" and report["environment"]["tiny"]
    assert set(report["sections"]) == {"canny", "sampling", "fp16", "train full-weight", "train low-memory"}
    rows = report["rows"]
    assert all(set(r) == set(gpu.COLUMNS) for r in rows)
    for r in rows:  # every JSON row is a line of the printed markdown table
        assert "| " + r["benchmark"] in table and r["result"] in table

    canny = report["sections"]["canny"]
    assert canny["bit_exact"] and canny["images"] == 16 and canny["speedup"] > 0
    sampling = report["sections"]["sampling"]
    assert sampling["finite"] and sampling["speedup"] > 5  # 40 UNet + ControlNet passes against one
    fp16 = report["sections"]["fp16"]
    assert fp16["finite"] and not fp16["storm"] and len(fp16["losses"]) == fp16["steps"]
    for mode in gpu.MODES:
        train = report["sections"][f"train {mode}"]
        assert [t["batch"] for t in train["tried"]] == [1, 2] and train["stop"] == "max_batch"
        assert train["largest"]["batch"] == 2 and train["nonfinite_steps"] == 0
        assert all(t["seconds_per_step"] > 0 and t["peak_bytes"] is None for t in train["tried"])
    train_rows = [r for r in rows if r["benchmark"].startswith("train")]
    assert len(train_rows) == 4 and all(r["peak memory"] == "n/a (cpu)" for r in train_rows)
    # Each mode's trainer is freed before the next is built (on a GPU its memory would count in the next peak).
    from jdm_train.train import Trainer

    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Trainer]


def test_cuda_without_a_gpu_is_refused_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu.json"
    assert bench.main(["gpu", "--device", "cuda", "--json", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "no CUDA device" in err
    assert not path.exists()


@pytest.mark.parametrize("fail, stop, tried, largest", [
    ("oom", "oom", [1, 2, 4, 8], 4),
    ("cap", "cap", [1, 2, 4, 8], 4),
    (None, "max_batch", [1, 2, 4, 8, 16], 16),
])
def test_batch_search_stops_at_oom_cap_or_max_batch(fail, stop, tried, largest):
    released = []

    def measure(b):
        if b == 8 and fail == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"batch": b, "peak_bytes": b * 2**30 * (4 if fail == "cap" and b == 8 else 1), "wall_s": 0.0,
                "seconds_per_step": 0.1 * b}

    out, why = gpu.search_batches(measure, 24 * 2**30, 16, release=lambda: released.append(1))
    assert why == stop and [r["batch"] for r in out] == tried
    assert gpu.largest_fitting(out, 24 * 2**30)["batch"] == largest
    assert released == ([1] if fail == "oom" else [])


def test_batch_search_keeps_to_the_time_budget():
    out, why = gpu.search_batches(lambda b: {"batch": b, "peak_bytes": None, "wall_s": 1e3}, 24 * 2**30, 64,
                                  deadline=0.0)
    assert why == "time" and [r["batch"] for r in out] == [1]
    assert gpu.search_batches(lambda b: {"batch": b, "peak_bytes": None, "wall_s": 0.0}, 1, 4,
                              deadline=math.inf)[1] == "max_batch"


def test_rows_for_a_mode_that_does_not_fit_the_cap():
    """The full-weight mode's likely outcomes: over the cap at batch 1 (a large GPU), or out of memory (24 GB)."""
    args = gpu.parse_args(["--device", "cpu"])
    over = {"mode": "full-weight", "trainable_params": 10, "stop": "cap",
            "tried": [{"batch": 1, "seconds_per_step": 1.5, "peak_bytes": 45 * 2**30}]}
    over["largest"] = gpu.largest_fitting(over["tried"], 24 * 2**30)
    batch1, largest = gpu.mode_rows(over, args)
    assert batch1["result"] == "1.500 s/step" and batch1["peak memory"] == "45.00 GiB"
    assert largest["result"] == "none" and "peaks at 45.00 GiB > 24 GiB" in largest["note"]
    oom = {"mode": "full-weight", "stop": "oom", "tried": [{"batch": 1, "oom": True}], "largest": None}
    assert [r["result"] for r in gpu.mode_rows(oom, args)] == ["none"]
    assert gpu.mode_rows({"mode": "full-weight", "oom_at_load": True}, args)[0]["result"] == \
        "out of memory while loading"
