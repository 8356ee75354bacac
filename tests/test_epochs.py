"""The one epoch loop (torchrun runs and search trials): what happens in which order."""
from coordinator.epochs import checkpoint_due, drive_epochs


class FakeGroup:
    steps_per_epoch = 7

    def __init__(self, log, driver=True):
        self.log, self.driver = log, driver

    def run_epoch(self, epoch, checkpoint):
        self.log.append(("run", epoch, checkpoint))
        return [f"m{epoch}"] if self.driver else None

    def commit_checkpoint(self, done):
        self.log.append(("commit", done))
        return f"ckpt{done}"

    def save_final(self):
        self.log.append(("final",))


class FakeRecorder:
    def __init__(self, log):
        self.log = log

    def log_epoch(self, metrics):
        self.log.append(("record", metrics))

    def finish(self, steps_per_epoch):
        self.log.append(("finish", steps_per_epoch))
        return {"summary": True}


def test_checkpoints_are_due_every_n_epochs_and_after_the_last():
    assert [checkpoint_due(e, 2, 5) for e in range(1, 6)] == [False, True, False, True, True]
    assert not any(checkpoint_due(e, 0, 5) for e in range(1, 6))


def test_rows_are_recorded_before_the_checkpoint_commits_and_the_end_before_the_last_report():
    log = []
    summary = drive_epochs(FakeGroup(log), 1, 3, 2, FakeRecorder(log),
                           report=lambda r: log.append(("report", r.epoch, r.checkpoint, r.first)))
    assert summary == {"summary": True}
    assert log == [
        ("run", 1, True), ("record", ["m1"]), ("commit", 2), ("report", 2, "ckpt2", True),
        ("run", 2, True), ("record", ["m2"]), ("commit", 3), ("final",), ("finish", 7), ("report", 3, "ckpt3", False),
    ]


def test_a_rank_that_is_not_the_driver_trains_saves_and_reports_nothing():
    log = []
    assert drive_epochs(FakeGroup(log, driver=False), 0, 2, 1, None, report=lambda r: log.append("report")) is None
    assert log == [("run", 0, True), ("commit", 1), ("run", 1, True), ("commit", 2), ("final",)]


def test_a_run_resumed_at_its_end_still_writes_its_final_states():
    log = []
    drive_epochs(FakeGroup(log), 2, 2, 1, FakeRecorder(log))
    assert log == [("final",), ("finish", 7)]
