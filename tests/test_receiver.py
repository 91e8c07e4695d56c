"""The Storage SCP's handler: what it takes in, what it refuses, what it quarantines."""

from __future__ import annotations

import copy

import pytest

from core.settings import Settings
from dicom.status import REFUSED as REFUSED_NOT_AUTHORIZED
from dicom.status import SUCCESS
from gateway.api import Gateway
from gateway.pull.receiver import Receiver, ReceiverConfig
from harness.synthetic import generate
from storage.series import SeriesWriter


@pytest.fixture
def setup(tmp_path):
    corpus = generate(tmp_path / "corpus", n_patients=2, slices=4, size=32, seed=3)
    gw = Gateway(Settings(home=tmp_path / "gw"))
    gw.create_project("recv")
    receiver = Receiver(ReceiverConfig.of(gw.core, "recv"))
    return corpus, gw, receiver


def datasets(corpus, series_uid):
    import pydicom

    out = [pydicom.dcmread(f) for f in corpus.files]
    return [d for d in out if d.SeriesInstanceUID == series_uid]


def test_only_expected_series_are_taken_in(setup):
    corpus, gw, receiver = setup
    keys, layout = receiver.keys, receiver.layout
    st, other = corpus.studies
    se = st.series[0]
    dss = datasets(corpus, se.series_uid)
    assert receiver.store(copy.deepcopy(dss[0]), "ORTHANC") == REFUSED_NOT_AUTHORIZED

    pseudo = keys.uid(se.series_uid)
    layout.expect(pseudo, keys.uid(st.study_uid), keys.pseudonym(st.patient_id))
    assert [receiver.store(d, "ORTHANC") for d in dss] == [SUCCESS] * len(dss)
    assert SeriesWriter(layout.data(pseudo), fsync=False).count == len(dss)

    # Same series UID claimed by another study: refused.
    forged = copy.deepcopy(datasets(corpus, se.series_uid)[0])
    forged.StudyInstanceUID = other.study_uid
    assert receiver.store(forged, "ORTHANC") == REFUSED_NOT_AUTHORIZED

    layout.forget(pseudo)
    late = datasets(corpus, se.series_uid)[0]
    assert receiver.store(late, "ORTHANC") == REFUSED_NOT_AUTHORIZED
    assert receiver.refused == 3
    assert len([e for e in gw.catalog.audit_trail("recv") if e.action == "store.refused"]) == 3


def test_another_patient_in_the_study_is_quarantined_not_stored(setup):
    corpus, _, receiver = setup
    keys, layout = receiver.keys, receiver.layout
    st = corpus.studies[0]
    se = st.series[0]
    pseudo = keys.uid(se.series_uid)
    layout.expect(pseudo, keys.uid(st.study_uid), keys.pseudonym(st.patient_id))
    dss = datasets(corpus, se.series_uid)
    dss[1].PatientID = "SOMEONE-ELSE"
    dss[2].BurnedInAnnotation = "YES"
    # The odd instance reaches another worker process, whose engine has not seen the study.
    other_worker = Receiver(receiver.cfg)
    statuses = [
        (other_worker if i == 1 else receiver).store(d, "ORTHANC") for i, d in enumerate(dss)
    ]
    assert statuses == [SUCCESS] * len(dss)
    assert SeriesWriter(layout.data(pseudo), fsync=False).count == len(dss) - 2
    reasons = layout.quarantined(pseudo)
    assert sum(reasons.values()) == 2
    assert any("two patients" in r for r in reasons)
    assert all("SOMEONE-ELSE" not in r and st.patient_id not in r for r in reasons)
