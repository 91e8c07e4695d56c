"""A PACS out of resources, for the fault tests and `make chaos`: a DICOM peer (pynetdicom) in
front of Orthanc that answers the first `busy` C-MOVE requests 0xA702 ("Refused: out of
resources - unable to perform sub-operations") and relays everything else to Orthanc as the
caller: C-ECHO, C-FIND (Study Root), C-MOVE (Orthanc sends the instances to the destination
itself). Orthanc does not answer 0xA702 on demand; a real PACS under load does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

OUT_OF_RESOURCES = 0xA702


class BusyPacs:
    """`with BusyPacs(orthanc_aet, orthanc_port, destinations, busy=2) as pacs:` listens on
    `pacs.port` as `pacs.aet`; `destinations` maps the C-MOVE destinations it may be asked for
    (AE title -> (host, port)), as a PACS's configuration does. `refused`: the C-MOVEs it
    answered 0xA702; `relayed`: those it passed on."""

    def __init__(
        self,
        upstream_aet: str,
        upstream_port: int,
        destinations: dict[str, tuple[str, int]],
        *,
        busy: int,
        aet: str = "BUSYPACS",
    ) -> None:
        self.upstream = ("127.0.0.1", upstream_port, upstream_aet)
        self.destinations, self.busy, self.aet = destinations, busy, aet
        self.refused = self.relayed = 0
        self.last_refused = 0.0  # time.monotonic() of the last 0xA702
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0

    def __enter__(self) -> BusyPacs:
        ae = AE(ae_title=self.aet)
        for cx in (Verification, StudyRootQueryRetrieveInformationModelFind):
            ae.add_supported_context(cx)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        # pynetdicom opens the association to the destination before a failure can be sent
        ae.add_requested_context(CTImageStorage)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_FIND, self._find),
            (evt.EVT_C_MOVE, self._move),
        ]
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()

    def _upstream(self, event: Any, context: Any) -> Any:
        """An association to Orthanc as the one who called us (Orthanc knows that AE)."""
        ae = AE(ae_title=event.assoc.requestor.ae_title)
        ae.add_requested_context(context)
        host, port, aet = self.upstream
        return ae.associate(host, port, ae_title=aet)

    def _find(self, event: Any) -> Iterator[Any]:
        assoc = self._upstream(event, StudyRootQueryRetrieveInformationModelFind)
        if not assoc.is_established:
            yield 0xA700, None
            return
        try:
            for status, identifier in assoc.send_c_find(
                event.identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                if status and status.Status in (0xFF00, 0xFF01):
                    yield status.Status, identifier
        finally:
            assoc.release()
        yield 0x0000, None

    def _move(self, event: Any) -> Iterator[Any]:
        dest = event.request.MoveDestination.strip()
        if isinstance(dest, bytes):
            dest = dest.decode().strip()
        host, port = self.destinations.get(dest, (None, None))
        yield host, port
        with self._lock:
            refuse = self.refused < self.busy
            if refuse:
                self.refused += 1
                self.last_refused = time.monotonic()
            else:
                self.relayed += 1
        status = OUT_OF_RESOURCES if refuse else self._relay_move(event, dest)
        if status == 0x0000:
            yield 0  # no sub-operations of ours: Orthanc sent the instances itself
            return
        yield 1  # a failure is a final response after the sub-operations' count
        yield status, None

    def _relay_move(self, event: Any, dest: str) -> int:
        assoc = self._upstream(event, StudyRootQueryRetrieveInformationModelMove)
        if not assoc.is_established:
            return 0xA700
        final = 0xC000
        try:
            for status, _ in assoc.send_c_move(
                event.identifier, dest, StudyRootQueryRetrieveInformationModelMove
            ):
                if status and status.Status not in (0xFF00,):
                    final = status.Status
        finally:
            assoc.release()
        return final
