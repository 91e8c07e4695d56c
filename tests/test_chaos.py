"""Faults of issue 19 (point 6) against real peers, the shorter versions of `make chaos`
(`harness.chaos`, which says what each plays and checks): the PACS down mid-pull, an
association aborted, the PACS out of resources (0xA702), a slow PACS, the object store down
mid-commit, the spool's disk full under a job, PostgreSQL restarted mid-job. Each must store
every instance once and leave nothing else wrong (`problems`). The PACS down at the start, a
short outage (the breaker) and a node killed mid-job are tested in test_cli,
test_source_limits and test_jobs_nodes; `make chaos` runs them all, longer."""

from __future__ import annotations

import pytest

from harness import chaos

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def lab(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("chaos")
    with chaos.Lab.up(root, patients=2, slices=16, s3=s3_server) as lab:
        yield lab


@pytest.mark.parametrize(
    "name",
    [
        "pacs-down-mid-pull",
        "association-aborted",
        "out-of-resources",
        "slow-pacs",
        "store-down-mid-commit",
        "spool-disk-full",
        "postgres-restarted",
    ],
)
def test_a_fault_loses_nothing_and_stores_nothing_twice(lab, name):
    out = chaos.SCENARIOS[name](lab, True)
    assert out.problems == [], out.row()
    assert out.stored == out.expected == lab.corpus.n_instances and out.duplicated == 0


def test_control_a_commit_that_does_not_wait_for_the_store_fails_its_series(lab):
    """Positive control of the store scenario: commits that do not wait (store_wait_s=0)
    fail their series while the store is down; the scenario says so."""
    out = chaos.store_down_mid_commit(lab, True, store_wait_s=0)
    assert any("series failed" in p for p in out.problems), out.row()
    assert any("series left failed" in p for p in out.problems), out.row()


def test_control_a_pacs_out_of_resources_without_waits_fails_the_series(lab):
    """Positive control: with no wait on 0xA702 (busy_retries=0) the refused series fail."""
    out = chaos.out_of_resources(lab, True, busy_retries=0)
    assert any("series failed" in p for p in out.problems), out.row()


def test_control_the_watch_sees_a_half_series(lab):
    """Positive control of `HalfSeriesWatch`: an instance gone from the index, a complete
    series' volume gone from the store, are both seen."""
    with chaos.site(lab, "watch-control") as st:
        assert st.gw.pull(st.project).ok
        watch = chaos.HalfSeriesWatch(st)
        watch.look()
        assert watch.seen == [] and watch.looks == 1
        with st.gw.catalog.session() as s:
            s.delete(s.query(chaos.IndexedInstance).first())
        row = st.gw.catalog.series(st.project_id, status="complete")[0]
        (st.gw.settings.home / "store" / row.storage_key / "volume" / "zarr.json").unlink()
        watch._read.clear()
        watch.look()
        assert any("indexed with" in s for s in watch.seen), watch.seen
        assert any("does not read back" in s for s in watch.seen), watch.seen
