"""Errors a user can act on. Their messages say what happened and what to do, and never hold an
identifier of a patient: the CLI prints them as they are, in one line."""


class SphereError(Exception):
    """A problem the user can act on (a wrong setting, a missing project, a peer that is down)."""


class NotSetUp(SphereError):
    """The gateway's home has no catalog (or vault) yet: a wrong SPHERE_HOME, or nothing created."""


class Unavailable(SphereError):
    """A database, the object store or the PACS cannot be reached."""


class ProjectError(SphereError):
    """A project action that cannot be done (unknown project, bad name, bad dates...)."""


class NotAllowed(SphereError):
    """The acting user's roles do not allow this (`core.access`): CLI exit 2, web 403."""


class VaultSealed(SphereError):
    """The vault cannot be opened here: no vault key (the research side never has one), a wrong
    key, or a process of the research side asking for it."""
