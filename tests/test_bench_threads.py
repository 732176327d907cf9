"""`bench threads` times the demo trainer with `--threads N`, alone and beside a busy process."""

import torch

from jdm_train import cli
from jdm_train.bench import threads


def test_threads_flag_sets_torch_threads(tmp_path):
    from jdm_train.train import Trainer

    before = torch.get_num_threads()
    try:
        Trainer(cli.parse_args(["--ckpt", "demo", "--threads", "1", "--output-dir", str(tmp_path)]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bench_threads_prints_one_row_per_thread_count(capsys):
    assert threads.main(["--steps", "1", "--warmup", "0", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == "| torch threads | alone s/step | beside a busy process s/step | slowdown |"
    cells = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert cells[0] == "1" and float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x")
