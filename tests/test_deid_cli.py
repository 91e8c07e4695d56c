"""`sphere deid` on local files and the trusted third party's `sphere vault` commands."""

from __future__ import annotations

import json

import pydicom
import pytest
from typer.testing import CliRunner

from core import vaultkey
from core.settings import Settings
from deid.keys import ProjectKeys
from deid.vault import Vault
from dicom import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.cli import app
from tests.adversarial import PATIENT, make_study, secondary_capture


@pytest.fixture()
def env(tmp_path):
    # The OS account that makes the home (by `project create`) is its first admin.
    return {"SPHERE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}


def sphere(env: dict[str, str], *args: str, code: int = 0) -> str:
    out = CliRunner().invoke(app, list(args), env=env)
    assert out.exit_code == code, out.output
    return out.output


def test_deid_files_with_a_project_profile_then_reidentify_as_trusted_third_party(tmp_path, env):
    study = make_study(tmp_path / "in", n=2)
    burned = secondary_capture(tmp_path / "in" / "sc.dcm", burned_in="YES")
    broken = tmp_path / "in" / "not-dicom.dcm"
    broken.write_bytes(b"hello")
    sphere(env, "project", "create", "trial", "--title", "t")
    out = tmp_path / "out"

    shown = sphere(env, "deid", *map(str, [*study.files, burned, broken]), "--project", "trial",
                   "--out", str(out))  # fmt: skip

    written = sorted(out.glob("*.dcm"))
    assert len(written) == len(study.files)
    assert "(0010,0010)" in shown and "Patient's Name" in shown  # the rule report
    assert "quarantined" in shown and "BurnedInAnnotation is YES" in shown
    report = json.loads((out / "deid-report.json").read_text())
    assert report["written"] == len(study.files)
    assert sum(report["quarantined"].values()) == 2
    everything = b"".join(p.read_bytes() for p in out.iterdir()).lower()
    assert not [p for p in study.phi if p.lower().encode() in everything]

    # The pseudonyms are the project's: the vault holds the secret and the mapping.
    settings = Settings(home=tmp_path / "home")
    with Vault(settings.resolved_vault_url(), vaultkey.load(settings)) as vault:
        keys = ProjectKeys(vault.project_secret("trial"))
    pseudonym = keys.pseudonym(PATIENT["id"])
    assert {pydicom.dcmread(p).PatientID for p in written} == {pseudonym}
    # The files are sphere's now: its implementation, not the source's, in the file meta.
    metas = [pydicom.dcmread(p).file_meta for p in written]
    assert {m.ImplementationClassUID for m in metas} == {IMPLEMENTATION_CLASS_UID}
    assert {m.ImplementationVersionName for m in metas} == {IMPLEMENTATION_VERSION_NAME}

    # The admin is no trusted third party: refused, and the try is in both trails.
    denied = sphere(env, "vault", "lookup", pseudonym, "--project", "trial", code=2)
    assert "may not vault.lookup" in denied and PATIENT["id"] not in denied
    token = sphere(env, "user", "add", "ttp").strip().splitlines()[-1]
    ttp = {**env, "SPHERE_TOKEN": token}
    assert "may not" in sphere(ttp, "vault", "lookup", pseudonym, "--project", "trial", code=2)
    assert "may not" in sphere(ttp, "vault", "grant", "ttp", code=2)  # nobody grants themselves
    sphere(env, "vault", "grant", "ttp")  # the admin does
    assert sphere(ttp, "vault", "lookup", pseudonym, "--project", "trial").strip() == PATIENT["id"]
    sop = pydicom.dcmread(written[0]).SOPInstanceUID
    original = sphere(ttp, "vault", "lookup", sop, "--project", "trial").strip()
    assert original in {str(pydicom.dcmread(f).SOPInstanceUID) for f in study.files}
    sphere(ttp, "vault", "lookup", "PNOSUCHPSEUDONYM", "--project", "trial", code=1)

    trail = sphere(ttp, "vault", "audit", "--project", "trial")
    assert "denied" in trail and "found" in trail and "not found" in trail
    assert PATIENT["id"] not in trail


def test_deid_with_a_trial_profile_and_an_unknown_project(tmp_path, env):
    study = make_study(tmp_path / "in", n=1)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"options": ["Retain UIDs Option"]}))
    sphere(env, "project", "create", "p2", "--title", "t")
    out = tmp_path / "out"
    sphere(env, "deid", str(study.ct[0]), "--project", "p2", "--out", str(out),
           "--profile", str(profile))  # fmt: skip
    (written,) = out.glob("*.dcm")
    assert pydicom.dcmread(written).SOPInstanceUID == study.ct_sop_uids[0]
    assert "no project" in sphere(env, "deid", str(study.ct[0]), "--project", "nope", "--out",
                                  str(out), code=2)  # fmt: skip
