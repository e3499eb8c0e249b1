"""Resume refuses a run it cannot continue. (A run killed with SIGKILL and resumed ends with weights
bit-identical to an uninterrupted run: tests/test_sweep.py kills a sweep's training job and checks it.)"""
import pytest


def test_resume_refuses_a_different_configuration(tmp_path):
    from models.engine.trainer import check_resumable
    saved = {"optim": {"lr": 0.001}, "train": {"resume": None, "num_workers": 0}}
    check_resumable(saved, {"optim": {"lr": 0.001}, "train": {"resume": "x", "num_workers": 4}}, tmp_path)
    with pytest.raises(ValueError, match=r"optim.lr: 0.001 -> 0.5"):
        check_resumable(saved, {"optim": {"lr": 0.5}, "train": {"resume": "x", "num_workers": 0}}, tmp_path)
