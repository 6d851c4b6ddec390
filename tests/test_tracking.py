"""W&B tracking: a failure is reported once and never stops training."""

from metadist import config
from metadist.tracking import NullTracker, WandbTracker, make_tracker


def test_a_failing_tracker_reports_once_and_goes_quiet(tmp_path, capsys):
    cfg = config.load(None, ["tracking.mode=offline", "run.name=guard"])
    t = WandbTracker(cfg.tracking, cfg.run.name, cfg.to_dict(), tmp_path)
    t.run.finish()  # a real failure: logging to a finished W&B run raises
    t.log({"loss": 1.0}, 1)
    t.log({"loss": 0.5}, 2)
    t.summary({"test_accuracy": 0.9})
    err = capsys.readouterr().err
    assert t.broken and err.count("W&B tracking failed") == 1


def test_disabled_or_non_main_tracking_is_a_null_tracker(tmp_path):
    off, on = config.load(None, ["tracking.mode=disabled"]), config.load(None, [])
    assert isinstance(make_tracker(off.tracking, "t", off.to_dict(), tmp_path, True), NullTracker)
    assert isinstance(make_tracker(on.tracking, "t", on.to_dict(), tmp_path, False), NullTracker)
