"""The role rule (`core.access`): global and project roles, the CLI's operator, refusals
audited, and the one lifecycle rule (`projects.require_active`, `Project.state`)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from core import Core, ProjectError, Settings, access, projects, users

TODAY = date.today()
DAY = timedelta(days=1)  # approvals meant to be in date run to tomorrow: a run may cross midnight


@pytest.fixture
def core(tmp_path):
    c = Core(Settings(home=tmp_path), create=True, actor="setup")
    projects.create(c, "p1")
    projects.create(c, "p2")
    for name in ("ada", "dan", "tess", "ivy", "val"):
        users.add(c, name)
    for name, role in (("ada", "admin"), ("dan", "data-manager"), ("tess", "trusted-third-party")):
        c.catalog.add_user_role(c.catalog.user(name).id, role, "setup")
    users.grant(c, "p1", "ivy", "investigator")
    users.grant(c, "p1", "val", "viewer")
    yield c
    c.close()


def test_global_and_project_roles_follow_the_table(core):
    u = core.catalog.user
    assert access.may(core, u("ada"), "user.add") and not access.may(core, u("dan"), "user.add")
    assert access.may(core, u("dan"), "pull", "p1")
    assert not access.may(core, u("ada"), "vault.lookup", "p1")  # the admin never reads the vault
    assert access.may(core, u("tess"), "vault.lookup", "p1")
    assert not access.may(core, u("tess"), "pull", "p1")
    assert access.may(core, u("ivy"), "pipeline.run", "p1")
    assert not access.may(core, u("ivy"), "pipeline.run", "p2")  # not its project
    assert not access.may(core, u("ivy"), "pipeline.run")  # a project role needs the project
    assert access.may(core, u("val"), "study.read", "p1")
    assert not access.may(core, u("val"), "export", "p1")
    assert not access.may(core, None, "project.read")
    with pytest.raises(ValueError):
        access.may(core, u("ada"), "no.such.action")


def test_a_refusal_is_audited_and_raises(core):
    with pytest.raises(access.NotAllowed, match="val may not pull"):
        access.require(core, "pull", "p1", user=core.catalog.user("val"))
    (row,) = core.catalog.audit_trail("p1", 1)
    assert (row.actor, row.action, row.outcome) == ("val", "pull", "refused")
    # Control: an allowed one is not refused and writes nothing.
    assert access.require(core, "pull", "p1", user=core.catalog.user("dan")).name == "dan"
    assert core.catalog.audit_trail("p1", 1)[0].id == row.id


def test_the_operator_is_a_token_or_a_mapped_os_account(core, monkeypatch):
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "unix-dan")
    with pytest.raises(access.NotAllowed, match="you are not a sphere user"):
        _ = Core(core.settings).operator
    assert core.catalog.audit_trail(None, 1)[0].actor == "os:unix-dan"
    users.map_account(core, "dan", "unix-dan")
    assert Core(core.settings).operator.name == "dan"
    token = users.reissue(core, "tess")
    with_token = core.settings.model_copy(update={"token": token})
    assert Core(with_token).operator.name == "tess"
    users.revoke(core, "tess")
    with pytest.raises(access.NotAllowed, match="SPHERE_TOKEN"):
        _ = Core(with_token).operator
    users.revoke(core, "dan")
    with pytest.raises(access.NotAllowed, match="revoked"):
        _ = Core(core.settings).operator


def test_state_and_require_active(core):
    p = core.project("p1")
    assert p.state(TODAY) == "declared"
    with pytest.raises(ProjectError, match="not approved"):
        projects.require_active(core, "p1", "pull", actor="dan")
    projects.approve(core, "p1", committee_ref="C", approved_on=TODAY - timedelta(days=9),
                     expires_on=TODAY - timedelta(days=1))  # fmt: skip
    assert core.project("p1").state(TODAY) == "expired"
    assert projects.summary(core, "p1").status == "expired"
    with pytest.raises(ProjectError, match="expired"):
        projects.require_active(core, "p1", "export", actor="dan")
    row = core.catalog.audit_trail("p1", 1)[0]
    assert (row.actor, row.action, row.outcome) == ("dan", "export", "refused")
    projects.approve(core, "p1", committee_ref="C", approved_on=TODAY, expires_on=TODAY)
    assert core.project("p1").approval_problem(TODAY) is None  # in date on its last day
    # a day's margin from here: a run crossing midnight checks against tomorrow
    projects.approve(core, "p1", committee_ref="C", approved_on=TODAY, expires_on=TODAY + DAY)
    assert projects.require_active(core, "p1", "pull").name == "p1"
    projects.revoke(core, "p1")
    assert core.project("p1").state(TODAY) == "revoked"
    with pytest.raises(ProjectError):
        projects.require_active(core, "p1", "pull")


def test_grants_follow_the_table(core):
    u = core.catalog.user
    users.add(core, "zoe")
    projects.approve(core, "p1", committee_ref="C", approved_on=TODAY, expires_on=TODAY + DAY)
    users.grant(core, "p1", "zoe", "viewer", by_user=u("ivy"))  # investigator -> viewer: yes
    with pytest.raises(access.NotAllowed):  # investigator -> investigator: no
        users.grant(core, "p1", "zoe", "investigator", by_user=u("ivy"))
    users.grant(core, "p1", "zoe", "investigator", by_user=u("dan"))
    with pytest.raises(access.NotAllowed, match="investigator's role"):  # no demoting
        users.grant(core, "p1", "zoe", "viewer", by_user=u("ivy"))
    with pytest.raises(access.NotAllowed):  # nor itself
        users.grant(core, "p1", "ivy", "viewer", by_user=u("ivy"))
    with pytest.raises(access.NotAllowed):  # a viewer grants nothing
        users.grant(core, "p1", "dan", "viewer", by_user=u("val"))
    with pytest.raises(users.UserError, match="unknown role 'boss'.*viewer"):
        users.grant(core, "p1", "zoe", "boss", by_user=u("dan"))
    # An unknown name answers like a known one to whoever may not manage users ...
    assert users.grant(core, "p1", "nobody", "viewer", by_user=u("ivy")) is False
    # ... and is named to an admin.
    with pytest.raises(users.UserError, match="no user named"):
        users.grant(core, "p1", "nobody", "viewer", by_user=u("ada"))
    # Global roles: an admin's, never one's own.
    with pytest.raises(access.NotAllowed):
        users.set_role(core, "zoe", "trusted-third-party", by_user=u("dan"))
    with pytest.raises(access.NotAllowed, match="themselves"):
        users.set_role(core, "ada", "trusted-third-party", by_user=u("ada"))
    users.set_role(core, "zoe", "trusted-third-party", by_user=u("ada"))
    assert access.may(core, u("zoe"), "vault.lookup", "p2")
    projects.revoke(core, "p1")
    with pytest.raises(ProjectError):  # no grant on a revoked project
        users.grant(core, "p1", "tess", "viewer", by_user=u("dan"))


def test_the_first_admin_is_made_once(core, monkeypatch):
    import getpass

    fresh = Core(Settings(home=core.settings.home / "new"), create=True)
    monkeypatch.setattr(getpass, "getuser", lambda: "root")
    name, token = users.first_admin(fresh)
    assert name == "root" and fresh.operator.name == "root"
    assert access.may(fresh, fresh.operator, "role.grant")
    assert users.first_admin(fresh) is None
    assert users.authenticate(fresh, token).name == "root"
    fresh.close()


def test_a_revoked_user_gets_no_token_until_enabled(core):
    users.revoke(core, "val")
    with pytest.raises(users.UserError, match="revoked"):
        users.reissue(core, "val")
    assert not core.catalog.user("val").active
    token = users.enable(core, "val")
    assert users.authenticate(core, token).name == "val"
