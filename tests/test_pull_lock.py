"""One pull per project at a time: the lock row in the catalog, on SQLite and across two
'nodes' (two engines) on a real PostgreSQL; a dead or silent holder is taken over."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from core import access, users
from core.settings import Settings
from gateway.api import Gateway
from gateway.pull import lock as pull_lock
from gateway.pull.lock import ProjectPullLock, PullBusy
from storage.catalog import Catalog, PullLock, utcnow


@pytest.fixture
def gw(tmp_path):
    g = Gateway(Settings(home=tmp_path, actor="tester"))
    g.create_project("locked", title="t")
    return g


def test_a_second_holder_is_refused_with_who_holds_it(gw):
    project = gw.core.project("locked")
    with ProjectPullLock(gw.catalog, project, "alice"):
        with pytest.raises(PullBusy) as refused:
            ProjectPullLock(gw.catalog, project, "bob").take()
        line = str(refused.value)
        assert "locked is being pulled on" in line and "by alice" in line and "pid" in line
        assert "\n" not in line
    with ProjectPullLock(gw.catalog, project, "bob") as again:  # released: free again
        assert again.took_over == ""
    assert gw.catalog.pull_lock(project.id) is None


def test_a_second_pull_on_the_cli_is_one_line_and_exit_2(gw, tmp_path):
    """`sphere pull P` while a live pull (here: this process) holds P: refused before anything
    is opened or written (no SCP, no series, no spool), one line naming the holder."""
    from datetime import date

    token = users.add(gw.core, "dan")
    gw.catalog.add_user_role(gw.catalog.user("dan").id, access.DATA_MANAGER, "tester")
    gw.approve(
        "locked",
        committee_ref="C-1",
        approved_on=date.today() - timedelta(days=1),
        expires_on=date.today() + timedelta(days=9),
    )
    env = {**os.environ, "SPHERE_HOME": str(tmp_path), "SPHERE_TOKEN": token}
    env["SPHERE_PACS__PORT"] = "9"  # nothing answers there: the pull must not get that far
    with ProjectPullLock(gw.catalog, gw.core.project("locked"), "alice"):
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "pull", "locked"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert f"pid {os.getpid()}, by alice" in line and "locked is being pulled on" in line
    assert gw.catalog.series(gw.core.project("locked").id) == []
    assert not (tmp_path / "spool" / "locked").exists()


def test_a_dead_process_on_this_host_is_taken_over(gw):
    project = gw.core.project("locked")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = ProjectPullLock(gw.catalog, project, "alice")
    assert gw.catalog.take_pull_lock(
        project.id, stale.token, host=stale.host, pid=dead.pid, actor="alice"
    )
    with ProjectPullLock(gw.catalog, project, "bob") as taker:
        assert "process is gone" in taker.took_over and "alice" in taker.took_over
        assert gw.catalog.pull_lock(project.id).token == taker.token
        # The old holder, were it alive, could no longer renew: it knows it lost the lock.
        assert not gw.catalog.renew_pull_lock(project.id, stale.token)


def test_a_silent_holder_on_another_host_is_taken_over_only_after_its_lease(gw):
    project = gw.core.project("locked")
    assert gw.catalog.take_pull_lock(project.id, "t-1", host="node-b", pid=1, actor="carol")
    with pytest.raises(PullBusy, match="node-b"):  # alive as far as we can tell: refused
        ProjectPullLock(gw.catalog, project, "bob").take()
    old = utcnow() - timedelta(seconds=pull_lock.LEASE_S + 5)
    with gw.catalog.session() as s:
        s.execute(update(PullLock).values(heartbeat=old))
    with ProjectPullLock(gw.catalog, project, "bob") as taker:
        assert "node-b" in taker.took_over and "no heartbeat" in taker.took_over


def test_heartbeat_keeps_the_lock_and_notices_losing_it(gw, monkeypatch):
    monkeypatch.setattr(pull_lock, "BEAT_S", 0.05)
    project = gw.core.project("locked")
    with ProjectPullLock(gw.catalog, project, "alice") as held:
        first = gw.catalog.pull_lock(project.id).heartbeat
        threading.Event().wait(0.3)
        assert gw.catalog.pull_lock(project.id).heartbeat > first
        with gw.catalog.session() as s:  # another pull took it over
            s.execute(update(PullLock).values(token="someone-else"))
        threading.Event().wait(0.3)
        assert held.lost


@pytest.mark.peers
def test_two_nodes_race_for_the_lock_on_postgresql(tmp_path, pg_server):
    """Two catalogs (as two nodes would open) on one PostgreSQL: of many simultaneous takes,
    exactly one wins each round."""
    url = pg_server.create_database("locks")
    gw = Gateway(Settings(home=tmp_path, actor="tester", catalog_url=url))
    gw.create_project("shared", title="t")
    pid = gw.core.project("shared").id
    nodes = [Catalog(url), Catalog(url)]
    for round_ in range(5):
        won = race(nodes, pid, 8, f"r{round_}")
        assert len(won) == 1
        assert nodes[0].pull_lock(pid).token == won[0]
        nodes[1].release_pull_lock(pid, won[0])
    for c in nodes:
        c.dispose()


def race(nodes: list[Catalog], project_id: int, n: int, prefix: str) -> list[str]:
    """`n` threads, alternating between the nodes, take the lock at once; the winners' tokens."""
    start = threading.Barrier(n)
    won: list[str] = []

    def take(i: int) -> None:
        start.wait()
        token = f"{prefix}-{i}"
        node = nodes[i % len(nodes)]
        if node.take_pull_lock(project_id, token, host=f"node-{i % 2}", pid=i, actor="x"):
            won.append(token)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_a_heartbeat_that_cannot_reach_the_catalog_for_a_lease_counts_as_lost(gw, monkeypatch):
    """Past a lease without a heartbeat, another pull may take the lock over: the holder
    stops committing (lost) until a heartbeat gets through with its token still there."""
    monkeypatch.setattr(pull_lock, "BEAT_S", 0.02)
    monkeypatch.setattr(pull_lock, "LEASE_S", 0.1)
    project = gw.core.project("locked")
    renew = gw.catalog.renew_pull_lock

    def down(*_args: object) -> bool:
        raise ConnectionError("catalog down")

    with ProjectPullLock(gw.catalog, project, "alice") as held:
        monkeypatch.setattr(gw.catalog, "renew_pull_lock", down)
        threading.Event().wait(0.4)
        assert held.lost
        monkeypatch.setattr(gw.catalog, "renew_pull_lock", renew)
        threading.Event().wait(0.3)
        assert not held.lost  # nobody took it meanwhile: held again
