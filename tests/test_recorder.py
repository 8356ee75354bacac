"""Rank 0's console lines: every node of a small graph, the target and the spread of the
others for a large one."""
import logging

from actors.metrics import NodeEpochMetrics
from coordinator.recorder import RunRecorder
from coordinator.rundir import RunDir
from tests.helpers import small_config


def epoch_rows(m):
    return [NodeEpochMetrics(epoch=1, node=i, model="convnet", frozen=False, train_loss=1.0 + i, train_acc=50.0, lr=0.1,
                             skipped_steps=0, train_time_s=1.0, val_acc=40.0 + i, ensemble_val_acc=70.0,
                             test_acc=30.0 + i, ensemble_test_acc=71.0) for i in range(m)]


def console(tmp_path, m, caplog):
    cfg = small_config(["convnet"] * m, [["Through"] * m] * m)
    rec = RunRecorder(cfg, RunDir(tmp_path), cfg.to_dict())
    with caplog.at_level(logging.INFO, logger="ktg"):
        rec.log_epoch(epoch_rows(m))
        rec.finish(steps_per_epoch=3)
    return [r.getMessage() for r in caplog.records]


def test_a_small_graph_spells_out_every_node(tmp_path, caplog):
    epoch, final = console(tmp_path, 3, caplog)[:2]
    assert "n2 convnet loss 3.000 val  42.0 test  32.0" in epoch
    assert final.startswith("final test accuracy: node 0 (convnet) 30.00%, node 1 (convnet) 31.00%, node 2 (convnet) 32.00%")


def test_a_large_graph_shows_the_target_and_the_spread_of_the_others(tmp_path, caplog):
    epoch, final = console(tmp_path, 12, caplog)[:2]
    assert "n0 convnet loss 1.000 val  40.0 test  30.0 | the other 11: val mean  46.0 [41.0-51.0] test mean  36.0 [31.0-41.0]" in epoch
    assert "n5 " not in epoch
    assert final == "final test accuracy: node 0 (convnet) 30.00%; the other 11: mean 36.00 [31.00-41.00]; ensemble 71.00%"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 12  # every node recorded
