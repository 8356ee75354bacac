"""Checkpoints are written atomically: a failed write leaves the previous file intact."""
import pytest
import torch

from actors.files import atomic_save, load_model_weights


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "node0.pt"
    atomic_save({"model": {"w": torch.ones(2)}, "meta": {"model": "convnet"}}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"model": {"w": torch.zeros(2)}, "bad": Unpicklable()}, path)
    state, meta = load_model_weights(path)
    assert torch.equal(state["w"], torch.ones(2)) and meta == {"model": "convnet"}
    assert [p.name for p in tmp_path.iterdir()] == ["node0.pt"]  # no temporary left behind


def test_bare_state_dict_is_accepted(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "s.pt")
    assert load_model_weights(tmp_path / "s.pt")[1] == {}
