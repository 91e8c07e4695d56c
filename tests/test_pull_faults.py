"""A pull's faults (issue 19): the catalog never says more than the store holds — two pulls of
one project at once, a pull killed and taken over, `sphere verify` catching a damaged series that
the next pull fetches again — and every failure path ends cleanly: the Storage SCP's port in use,
the store down, the spool's disk full. Real Orthanc, real `sphere` processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import event

from core import Unavailable, access, users
from core.settings import PacsPeer, S3Options, Settings
from gateway.api import Gateway
from gateway.pull import PullBusy
from gateway.pull.stops import PullStopped
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate
from storage.catalog import SeriesRecord
from storage.series import series_key, unreadable
from tests.orthanc_fixture import seeded_orthanc
from tests.test_pull import approved

pytestmark = pytest.mark.peers
SPHERE = [sys.executable, "-m", "gateway.cli"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus"), n_patients=4, slices=24, size=64, seed=11)


@pytest.fixture(scope="module")
def scp_port():
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, corpus, scp_port):
    with seeded_orthanc(tmp_path_factory.mktemp("orthanc"), corpus.files, scp_port) as orthanc:
        yield orthanc


def gateway(home: Path, pacs: LocalOrthanc, port: int) -> Gateway:
    settings = Settings(
        home=home,
        port=port,
        pacs=PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port),
        actor="tester",
        fsync=False,
        backoff_s=0.1,
    )
    return Gateway(settings)


def env_for(gw: Gateway, pacs: LocalOrthanc, port: int) -> dict[str, str]:
    """The `sphere` CLI's settings, acting as a data manager (by token)."""
    token = users.add(gw.core, "dan")
    user = gw.catalog.user("dan")
    assert user is not None
    gw.catalog.add_user_role(user.id, access.DATA_MANAGER, "tester")
    return {
        **os.environ,
        "SPHERE_HOME": str(gw.settings.home),
        "SPHERE_TOKEN": token,
        "SPHERE_PORT": str(port),
        "SPHERE_PACS__AE_TITLE": pacs.aet,
        "SPHERE_PACS__PORT": str(pacs.dicom_port),
        "SPHERE_FSYNC": "false",
        "SPHERE_BACKOFF_S": "0.1",
    }


def sphere(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPHERE, *args], capture_output=True, text=True, env=env, timeout=300)


def wait_for_lock(gw: Gateway, project: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    pid = gw.core.project(project).id
    deadline = time.monotonic() + timeout_s
    while gw.catalog.pull_lock(pid) is None:
        assert proc.poll() is None, "the first pull ended before it was seen holding the lock"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def unreadable_complete(gw: Gateway, project: str, deep: bool = True) -> dict[str, str]:
    """Every series the catalog calls complete, read back: those that do not read, and why."""
    rows = gw.catalog.series(gw.core.project(project).id, status="complete")
    assert rows
    bad = {
        r.series_uid: unreadable(gw.store, r.storage_key or "", r.stored, deep=deep) for r in rows
    }
    return {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("trial", range(3))
def test_concurrent_pulls_leave_every_complete_series_readable(
    tmp_path, pacs, scp_port, corpus, trial
):
    """Issue 19's trial: `SPHERE_PORT=A sphere pull P &`, then `SPHERE_PORT=B sphere pull P`,
    then `sphere pull P` alone; every series the catalog calls complete reads back whole."""
    gw = gateway(tmp_path, pacs, scp_port)
    approved(gw, "twice", [st.accession for st in corpus.studies])
    env = env_for(gw, pacs, scp_port)
    first = subprocess.Popen(
        [*SPHERE, "pull", "twice"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_lock(gw, "twice", first)
        # The second pull, from this process (it starts in milliseconds, so it surely meets
        # the first mid-pull); its one line on the CLI is tested in test_pull_lock.
        with pytest.raises(PullBusy) as refused:
            gateway(tmp_path, pacs, free_port()).pull("twice")
    finally:
        out, err = first.communicate(timeout=300)
    assert "twice is being pulled on" in str(refused.value)
    assert f"pid {first.pid}" in str(refused.value)
    assert first.returncode == 0, out + err  # not disturbed by the second
    third = sphere("pull", "twice", env=env)
    assert third.returncode == 0, third.stdout + third.stderr
    n_series = sum(len(st.series) for st in corpus.studies)
    assert len(gw.catalog.series(gw.core.project("twice").id, status="complete")) == n_series
    assert unreadable_complete(gw, "twice") == {}
    refused = [e for e in gw.catalog.audit_trail("twice") if e.outcome == "refused"]
    assert len(refused) == 1 and "being pulled" in refused[0].detail


PULL_SCRIPT = """
import sys
from pathlib import Path
from gateway.api import Gateway
from gateway.pull import PullBusy
from gateway.pull.stops import PullStopped
from core import Unavailable, access, users
from core.settings import PacsPeer, S3Options, Settings
home, aet, port, scp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
gw = Gateway(Settings(home=Path(home), port=scp, actor="tester", max_associations=1,
                      fsync=False, pacs=PacsPeer(ae_title=aet, port=port)))
gw.pull("killed")
"""


def test_the_lock_of_a_killed_pull_is_taken_over(tmp_path, pacs, scp_port, corpus):
    gw = gateway(tmp_path, pacs, scp_port)
    approved(gw, "killed", [st.accession for st in corpus.studies])
    args = [str(tmp_path), pacs.aet, str(pacs.dicom_port), str(scp_port)]
    proc = subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, *args], start_new_session=True)
    try:
        wait_for_lock(gw, "killed", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the pull and its SCP workers, at once
        proc.wait(30)
    held = gw.catalog.pull_lock(gw.core.project("killed").id)
    assert held is not None and held.pid == proc.pid  # the dead pull still "holds" it

    report = gw.pull("killed")

    assert report.ok, [s.error for s in report.series if s.error]
    assert gw.catalog.pull_lock(gw.core.project("killed").id) is None  # released at the end
    (took,) = [e for e in gw.catalog.audit_trail("killed") if e.action == "pull.lock"]
    assert "process is gone" in took.detail and str(proc.pid) in took.detail
    assert unreadable_complete(gw, "killed") == {}


def test_verify_marks_a_damaged_series_failed_and_the_next_pull_fetches_it_again(
    tmp_path, pacs, scp_port, corpus
):
    gw = gateway(tmp_path, pacs, scp_port)
    st = corpus.studies[0]
    approved(gw, "checked", [st.accession])
    assert gw.pull("checked").ok
    env = env_for(gw, pacs, scp_port)
    intact = sphere("verify", "checked", "--deep", env=env)
    assert intact.returncode == 0 and "0 unreadable" in intact.stdout, intact.stderr

    keys = gw.keys("checked")
    damaged = keys.uid(st.series[0].series_uid)
    key = series_key("checked", keys.uid(st.study_uid), damaged)
    (tmp_path / "store" / key / "volume" / "zarr.json").unlink()  # the trial's damage
    found = sphere("verify", "checked", env=env)

    assert found.returncode == 1, found.stdout + found.stderr
    assert f"unreadable  {damaged}" in found.stdout and "1 unreadable" in found.stdout
    project = gw.core.project("checked")
    with gw.catalog.session() as s:
        row = s.query(SeriesRecord).filter_by(project_id=project.id, series_uid=damaged).one()
        assert row.status == "failed" and row.error.startswith("verify:")
    assert gw.catalog.indexed_series(project.id, keys.uid(st.study_uid), damaged) == []

    again = gw.pull("checked")

    assert again.ok
    assert [s.pseudo_series for s in again.series if s.status == "complete"] == [damaged]
    assert again.count("skipped") == len(st.series) - 1
    assert unreadable_complete(gw, "checked") == {}
    assert gw.catalog.indexed_series(project.id, keys.uid(st.study_uid), damaged) != []


def test_the_storage_scps_port_in_use_is_one_line_and_nothing_is_created(
    tmp_path, pacs, scp_port, corpus
):
    gw = gateway(tmp_path, pacs, scp_port)
    approved(gw, "busyport", [corpus.studies[0].accession])
    env = env_for(gw, pacs, scp_port)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    with taken:
        out = sphere("pull", "busyport", env={**env, "SPHERE_PORT": str(port)})
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "SPHERE_PORT" in line and "unexpected" not in line
    assert gw.catalog.series(gw.core.project("busyport").id) == []
    assert not (tmp_path / "spool" / "busyport").exists()
    assert not (tmp_path / "store" / "projects" / "busyport").exists()
    (end,) = [e for e in gw.catalog.audit_trail("busyport") if e.action == "pull.end"]
    assert end.outcome == "error" and str(port) in end.detail
    assert gw.catalog.pull_lock(gw.core.project("busyport").id) is None


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_the_store_down_is_found_before_the_pacs_is_asked(tmp_path, pacs, corpus, where):
    """A store that takes no write (a folder under a file; an S3 endpoint nobody answers at):
    the pull says so before any C-FIND (the PACS port given answers nothing, so reaching it
    would end in another error)."""
    (tmp_path / "not-a-folder").write_text("")
    store: dict = {"storage_url": str(tmp_path / "not-a-folder" / "store")}
    if where == "s3":
        endpoint = f"http://127.0.0.1:{free_port()}"
        store = {
            "storage_url": "s3://bucket/research",
            "s3": S3Options(endpoint=endpoint, access_key="a", secret_key="b"),
        }
    gw = Gateway(
        Settings(
            home=tmp_path,
            port=free_port(),
            pacs=PacsPeer(ae_title=pacs.aet, port=free_port()),
            actor="tester",
            fsync=False,
            **store,
        )
    )
    approved(gw, "nostore", [corpus.studies[0].accession])
    with pytest.raises(Unavailable, match="unavailable during probe.*nothing was pulled"):
        gw.pull("nostore")
    assert gw.catalog.series(gw.core.project("nostore").id) == []
    (end,) = [e for e in gw.catalog.audit_trail("nostore") if e.action == "pull.end"]
    assert end.outcome == "error" and "probe" in end.detail


FULL_SPOOL = """
set -e
mount -t tmpfs -o size=200k tmpfs "$SPOOL"
set +e
"$PYTHON" -m gateway.cli pull full
rc=$?
echo "tmp left: $(find "$SPOOL" -name '*.tmp' | wc -l)"
exit $rc
"""


def test_a_full_spool_disk_ends_the_pull_cleanly(tmp_path, pacs, scp_port, corpus):
    """The spool on a 200 KB tmpfs (its own mount namespace): the receivers answer 0xA700, the
    pull stops with the summary, one line and exit 2, the `pull.end` row, no series pending and
    no `.tmp` left; with room again, the re-run completes."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here (unshare -rm)")
    gw = gateway(tmp_path, pacs, scp_port)
    approved(gw, "full", [st.accession for st in corpus.studies[:2]])
    env = env_for(gw, pacs, scp_port)
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    env.update(SPOOL=str(spool), PYTHON=sys.executable, SPHERE_SPOOL_MIN_FREE_MB="0.05")
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", FULL_SPOOL],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "tmp left: 0" in out.stdout
    assert "series" in out.stdout  # the summary
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and "unexpected" not in out.stderr
    project = gw.core.project("full")
    statuses = {r.status for r in gw.catalog.series(project.id)}
    assert "pending" not in statuses and "failed" in statuses
    (end,) = [e for e in gw.catalog.audit_trail("full") if e.action == "pull.end"]
    assert end.outcome == "error" and "no space left" in end.detail
    assert gw.catalog.pull_lock(project.id) is None

    again = sphere("pull", "full", env=env_for_again(env))
    assert again.returncode == 0, again.stdout + again.stderr
    assert unreadable_complete(gw, "full") == {}


def env_for_again(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("SPOOL", "PYTHON")}


def test_a_full_catalog_ends_the_pull_cleanly(tmp_path, pacs, scp_port, corpus):
    """SQLite's own limit (max_page_count) makes the catalog full mid-pull: a real
    SQLITE_FULL ("database or disk is full"), as a full disk gives. The pull stops with one
    line naming the catalog, not "unexpected OperationalError"; the next pull completes."""
    gw = gateway(tmp_path, pacs, scp_port)
    approved(gw, "fullcat", [st.accession for st in corpus.studies[:2]])
    engine = gw.catalog.engine
    with engine.connect() as c:
        pages = c.exec_driver_sql("PRAGMA page_count").scalar()

    def limit(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 6}")

    engine.dispose()
    event.listen(engine, "connect", limit)
    try:
        with pytest.raises(PullStopped) as stopped:
            gw.pull("fullcat")
    finally:
        event.remove(engine, "connect", limit)
        engine.dispose()
    line = str(stopped.value)
    assert "the catalog database failed (database or disk is full)" in line, line
    assert "\n" not in line and stopped.value.report.count("complete") < 4
    project = gw.core.project("fullcat")
    assert gw.catalog.pull_lock(project.id) is None
    pending = [r for r in gw.catalog.series(project.id) if r.status == "pending"]
    if "left pending" not in line:  # said, when not even that could be written
        assert pending == []
        (end,) = [e for e in gw.catalog.audit_trail("fullcat") if e.action == "pull.end"]
        assert end.outcome == "error" and "database or disk is full" in end.detail
    again = gw.pull("fullcat")
    assert again.ok, [s.error for s in again.series if s.error]
    assert unreadable_complete(gw, "fullcat") == {}


def test_a_commit_that_does_not_read_back_is_never_marked_complete(
    tmp_path, pacs, scp_port, corpus, monkeypatch
):
    """Positive control of the read-back before "complete": a commit whose headers vanish
    right after it (as a second writer's delete did in issue 19) leaves the series failed,
    with the reason, out of the QIDO-RS index; the next pull stores it whole."""
    import shutil

    from storage.series import SeriesWriter

    gw = gateway(tmp_path, pacs, scp_port)
    st = corpus.studies[0]
    approved(gw, "readback", [st.accession])
    commit = SeriesWriter.commit

    def commit_then_lose_headers(self, store, key):
        info = commit(self, store, key)
        shutil.rmtree(tmp_path / "store" / key / "headers")
        return info

    monkeypatch.setattr(SeriesWriter, "commit", commit_then_lose_headers)
    report = gw.pull("readback")
    monkeypatch.undo()

    assert not report.ok and report.count("complete") == 0
    assert all("does not read back" in s.error for s in report.series)
    project = gw.core.project("readback")
    assert gw.catalog.series(project.id, status="complete") == []
    keys = gw.keys("readback")
    assert gw.catalog.indexed_series(project.id, keys.uid(st.study_uid)) == []
    for se in st.series:  # the broken groups are not left looking whole to a store listing
        key = series_key("readback", keys.uid(st.study_uid), keys.uid(se.series_uid))
        assert not (tmp_path / "store" / key / "zarr.json").exists()
    again = gw.pull("readback")
    assert again.ok and again.count("complete") == len(st.series)
    assert unreadable_complete(gw, "readback") == {}
