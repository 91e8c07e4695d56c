"""What a researcher reaches through the server: the results page (table, PNG reports, CSV and
Parquet) and the dataset over HTTP (the local loader's tensors; the README's training loop), by
role and audited, against a real `sphere serve` app on a loopback port."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Orientationd
from PIL import Image

from core import Core, Settings, SphereError, access, users
from processing.body_hu import BodyHu
from processing.loader import SeriesDataset
from processing.remote import Client, RemoteError, RemoteSeriesDataset
from processing.worker import SeriesTask, process_series
from tests.processing_data import body_volume, ct_series, new_project, store_series
from tests.web_server import fetch, serving

PROJECT = "study"


@dataclass
class Served:
    settings: Settings
    url: str
    tokens: dict[str, str]  # role -> token
    keys: list[str]  # storage keys of the CT series


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("researchers")
    settings = Settings(home=tmp / "home", fsync=False)
    new_project(settings, PROJECT)
    keys = []
    for seed in (1, 2):  # committed complete and indexed
        dss = ct_series(body_volume(seed=seed), seed=seed)
        keys.append(store_series(settings, PROJECT, dss, tmp / "spool"))
    with Core(settings) as c:
        p = c.project(PROJECT)
        tokens = {}
        for role, name in (("investigator", "ivy"), ("viewer", "val"), ("none", "nobody")):
            tokens[role] = users.add(c, name)
            if role != "none":
                users.grant(c, PROJECT, name, role)
        rows = {r.storage_key: r for r in c.catalog.series(p.id)}
    for key in keys:
        r = rows[key]
        task = SeriesTask(PROJECT, r.series_uid, r.study_uid, r.patient_pseudonym, key)
        assert process_series(settings.model_dump_json(), task, BodyHu(), False).status == "ok"
    with Core(settings) as core, serving(core) as url:
        yield Served(settings, url, tokens, keys)


def test_results_page_lists_pseudonyms_shifted_dates_and_reports(served):
    base = f"{served.url}/projects/{PROJECT}/results"
    page = fetch(base, served.tokens["viewer"])
    assert page.status == 200
    html = page.body.decode()
    assert html.count("PSEUDO1") >= 1 and "PSEUDO2" in html and "2020-01-01" in html
    assert "body-hu" in html and " HU" in html
    pngs = [s.split('"')[0] for s in html.split('<img src="')[1:]]
    assert len(pngs) == 2
    img = fetch(served.url + pngs[0].replace("&amp;", "&"), served.tokens["viewer"])
    assert img.status == 200 and Image.open(io.BytesIO(img.body)).format == "PNG"
    # Control: a series with no report is 404, and who is no member sees nothing.
    assert fetch(f"{base}/1.2.3/body-hu.png", served.tokens["viewer"]).status == 404
    assert fetch(base, served.tokens["none"]).status == 404
    assert fetch(base).status == 401


def test_results_page_shows_a_reason_and_flags_both(served):
    with Core(served.settings) as c:
        p = c.project(PROJECT)
        kept = c.catalog.results(p.id)[0]
        cols = ("status", "version", "study_uid", "reason", "values", "provenance", "report_key")
        before = {k: getattr(kept, k) for k in cols}
        c.catalog.upsert_result(
            p.id, kept.series_uid, kept.pipeline,
            **{**before, "reason": "PLANTED-REASON", "values": {**kept.values, "flags": "FLAG-X"}},
        )  # fmt: skip
    try:
        page = fetch(f"{served.url}/projects/{PROJECT}/results", served.tokens["viewer"])
        html = page.body.decode()
        assert "<th>reason</th><th>flags</th>" in html
        assert "<td>PLANTED-REASON</td><td>FLAG-X</td>" in html  # neither hides the other
    finally:
        with Core(served.settings) as c:
            c.catalog.upsert_result(c.project(PROJECT).id, kept.series_uid, kept.pipeline, **before)


def test_results_table_downloads_as_csv_and_parquet_for_who_may_export(served):
    api = f"{served.url}/api/projects/{PROJECT}/results"
    got = fetch(api + ".csv", served.tokens["investigator"])
    assert got.status == 200 and got.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(got.body.decode())))
    assert {r["patient"] for r in rows} == {"PSEUDO1", "PSEUDO2"}
    assert {r["study_date"] for r in rows} == {"2020-01-01"}
    import pyarrow.parquet as pq

    pq_got = fetch(api + ".parquet", served.tokens["investigator"])
    table = pq.read_table(io.BytesIO(pq_got.body))
    assert table.num_rows == 2 and "body_mean_hu" in table.column_names
    # A viewer reads the page but may not take the table away (export), as on the CLI.
    assert not access.allows("export", {"viewer"})
    assert fetch(api + ".csv", served.tokens["viewer"]).status == 403


# -- the dataset over HTTP ----------------------------------------------------------------------


def audited(settings: Settings, action: str, n: int) -> list:
    """The audit rows of `action` once there are `n` (the server writes them in the background)."""
    deadline = time.monotonic() + 10
    while True:
        with Core(settings) as c:
            rows = c.catalog.audit_trail(PROJECT, 1000, action=action)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.mark.parametrize("form", ["RemoteSeriesDataset", "SeriesDataset(url)"])
def test_remote_dataset_gives_the_local_loaders_metatensors(served, form):
    token = served.tokens["viewer"]
    if form == "RemoteSeriesDataset":
        remote = RemoteSeriesDataset(served.url, PROJECT, token)
    else:  # one name for both: given a URL, SeriesDataset reads through the server
        remote = SeriesDataset(served.url, PROJECT, token=token)
        assert isinstance(remote, RemoteSeriesDataset)
    local = SeriesDataset(served.settings, PROJECT)
    assert isinstance(local, SeriesDataset) and not isinstance(local, RemoteSeriesDataset)
    assert len(remote) == len(local) == 2
    by_uid = {d["series_uid"]: d for d in local}
    pairs = [(r, by_uid[r["series_uid"]]) for r in remote]
    for r, loc in pairs:
        a, b = r["image"], loc["image"]
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(a.affine.numpy(), b.affine.numpy())
        for k in ("spacing", "spatial_shape", "space", "storage_key", "modality"):
            assert np.array_equal(a.meta[k], b.meta[k]), k
        # MONAI's usual first transform works on it (nibabel is there).
        ras = Orientationd("image", axcodes="LPS")({"image": a})["image"]
        assert ras.shape == a.shape
    # Control: the comparison tells two series apart (the pairing is by UID, not luck).
    (r1, _), (_, l2) = pairs
    assert not np.array_equal(r1["image"].numpy(), l2["image"].numpy())
    # Each series read is a row of the audit trail, by the reader's name and the series.
    rows = audited(served.settings, "dataset.volume", 2)
    assert {r.actor for r in rows} == {"val"}
    assert {json.loads(r.detail)["series"] for r in rows} >= {p[0]["series_uid"] for p in pairs}


def test_remote_dataset_goes_through_the_role_check(served):
    with pytest.raises(RemoteError, match="404"):  # no member: nothing, not even the project
        RemoteSeriesDataset(served.url, PROJECT, served.tokens["none"])
    with pytest.raises(RemoteError, match="401"):
        RemoteSeriesDataset(served.url, PROJECT, "sph_not-a-token")
    with pytest.raises(RemoteError, match="401"):  # SeriesDataset(url) asks the server too
        SeriesDataset(served.url, PROJECT, token="sph_not-a-token")
    with pytest.raises(SphereError, match="token="):
        SeriesDataset(served.url, PROJECT)
    with pytest.raises(SphereError, match="URL"):
        SeriesDataset("sphere.example.org", PROJECT, token="t")
    client = Client(served.url, PROJECT, served.tokens["viewer"])
    with pytest.raises(RemoteError, match="404"):  # a series of no project of theirs
        client.load("1.2.3.4")


def test_the_readmes_training_loop_runs(served, monkeypatch):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = text.split("<!-- remote-dataset-example -->")[1].split("```python")[1].split("```")[0]
    loop = code.strip().split("\n\n")[-1]  # after the imports
    assert len(loop.splitlines()) <= 10
    code = code.replace("https://sphere.example.org", served.url).replace('"spine"', repr(PROJECT))
    monkeypatch.setenv("SPHERE_TOKEN", served.tokens["investigator"])
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["loss"].item() >= 0 and scope["batch"]["image"].shape[0] == 2
