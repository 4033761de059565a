"""`make soak` in short (bench/soak.py): 90 s at c=32 of MNIST digits and the worst-case images of
bench/worst_cases.py against a real TorchServe, with three kills of a worker, a promote and a rollback.
Counts, not speeds: no wrong answer, nothing lost outside a killed worker's batch, worker memory flat.
"""

from __future__ import annotations

import pytest

from bench.soak import MAX_RSS_GROWTH, count, soak_corpus, soak_own_server

pytest_plugins = ["serving_fixtures"]


@pytest.mark.slow
def test_a_short_soak_answers_right_and_loses_nothing_outside_a_killed_batch(trained_checkpoint, mnist_dir,
                                                                             tmp_path, monkeypatch):
    # The soak signs with a key of its own through the environment (bench/rollout.py, a command's
    # process): set here, monkeypatch puts the session's key dir back for the tests after this one.
    monkeypatch.setenv("MNIST_SERVE_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.delenv("MNIST_SERVE_TRUSTED_DIR", raising=False)
    bodies, expected, ordinary = soak_corpus(trained_checkpoint, 50, str(mnist_dir))
    # Faults at 27.5 s (kill), 42.5 (promote), 57.5 (kill), 72.5 (rollback) and 87.5 (kill).
    soak = soak_own_server(trained_checkpoint, tmp_path, bodies, expected, ordinary, seconds=90, clients=32,
                           fault_every=15, warm_up=20)
    counts = count(soak, expected, ordinary)
    assert len(soak.kills) >= 2
    assert [s.split()[0] for s in soak.switches] == ["promote", "rollback"]
    assert [(r.status, r.detail) for r in counts.wrong] == []
    assert [(r.start, r.status, r.detail) for r in counts.lost] == []
    assert counts.answered > 1000 and counts.refused > 0 and counts.worst_case > 0
    assert counts.rss_growth, "no worker lived through the soak"
    assert max(counts.rss_growth.values()) <= MAX_RSS_GROWTH, counts.rss_growth
