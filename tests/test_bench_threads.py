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


def test_the_cli_asks_for_passive_openmp_waits_before_torch_loads():
    """`python -m jdm_train` sets OMP_WAIT_POLICY=PASSIVE (unless given) before torch is imported."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\nfrom jdm_train import cli\ncli.passive_openmp_waits()\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
    given = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(env, OMP_WAIT_POLICY="ACTIVE")).stdout
    assert given.split()[0] == "ACTIVE"
