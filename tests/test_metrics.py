"""The per-epoch metrics row: its recorded form and the one helper for edge keys."""
import pytest

from actors.metrics import EDGE_LOSS, GATE_WEIGHT, EdgeKey, NodeEpochMetrics, edge_key, parse_edge_key


def sample(**kw):
    base = dict(epoch=3, node=1, model="convnet", frozen=False, train_loss=0.5, train_acc=90.0, lr=0.1,
                skipped_steps=0, train_time_s=1.5, edges=[(1, "Through"), (0, "Linear")],
                edge_loss=[0.4, 0.1], gate_weight=[1.0, 0.25], val_acc=80.0, ensemble_val_acc=81.0,
                test_acc=79.0, ensemble_test_acc=82.0, first_step_at=1234.5)
    return NodeEpochMetrics(**{**base, **kw})


def test_edge_keys_round_trip_and_other_names_are_not_edges():
    assert edge_key(EDGE_LOSS, 0, 2, "Correct") == "edge_0_to_2_Correct"
    assert edge_key(GATE_WEIGHT, 12, 3, "NegativeLinear") == "gate_12_to_3_NegativeLinear"
    assert parse_edge_key("gate_12_to_3_NegativeLinear") == EdgeKey(GATE_WEIGHT, 12, 3, "NegativeLinear")
    for other in ("train_loss", "ensemble_val_acc", "edge_loss", "gate_x_to_1_Through", "edges"):
        assert parse_edge_key(other) is None
    with pytest.raises(ValueError):
        edge_key("edges", 0, 1, "Through")


def test_the_record_is_the_metrics_jsonl_row_without_driver_only_fields():
    row = sample().record()
    assert list(row) == ["epoch", "node", "model", "frozen", "train_loss", "train_acc", "lr", "skipped_steps",
                         "train_time_s", "edge_1_to_1_Through", "edge_0_to_1_Linear", "gate_1_to_1_Through",
                         "gate_0_to_1_Linear", "val_acc", "ensemble_val_acc", "test_acc", "ensemble_test_acc"]
    assert row["edge_0_to_1_Linear"] == 0.1 and row["gate_0_to_1_Linear"] == 0.25
    assert "first_step_at" not in row


def test_the_recorder_and_the_pictures_read_the_same_keys():
    from coordinator.recorder import wandb_metrics

    data = wandb_metrics([sample(node=0, edges=[(0, "Through")], edge_loss=[0.3], gate_weight=[1.0]).record(),
                          sample().record()])
    assert data["edge_loss/0->1 Linear"] == 0.1 and data["gate_weight/0->1 Linear"] == 0.25
    assert data["edge_loss/0->0 Through"] == 0.3 and data["node1/val_acc"] == 80.0
    assert not any(k.startswith("node") and ("edge" in k or "gate" in k) for k in data)
