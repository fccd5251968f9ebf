"""The records the core and its shell exchange (:mod:`marketstream.fanout.records`)."""

from marketstream.fanout import core
from marketstream.fanout.records import History, Read, Want


def test_only_a_resume_or_a_snapshot_needs_the_history():
    assert not Want().recovers and not Want(repair=True).recovers
    assert Want(since=0).recovers and Want(snapshot=True).recovers


def test_the_records_are_values_the_core_can_share_and_key_by():
    assert Want(since=5) == Want(5) and hash(Want(since=5)) == hash(Want(5))
    assert Read("trade.A_B", None, True) == Read("trade.A_B", None, True, token=0, max_bytes=0)
    assert History(None, None, []) == (None, None, [], None, False)


def test_the_core_still_exports_them_for_its_shell():
    assert (core.Want, core.Read, core.History) == (Want, Read, History)
    assert {"Want", "Read", "History", "Connection", "REPLAY_BYTES"} <= set(core.__all__)
