"""DICOMweb as a pull's source: QIDO-RS to plan, WADO-RS to retrieve. Nothing here speaks DIMSE:
an instance of the multipart stream reaches the receiver as a C-STORE's would."""

from __future__ import annotations

import logging
from io import BytesIO
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.uid import UID

from dicom.json_model import first, values
from dicom.received import ReceivedInstance
from dicom.status import CANNOT_UNDERSTAND, SUCCESS
from gateway.pull.base import ReceivesHere
from gateway.pull.guard import SourceError
from gateway.pull.receiver import ReceiverConfig
from gateway.pull.source import RetrieveResult, SeriesHit, StudyHit
from gateway.web.client import DicomwebClient, DicomwebError

log = logging.getLogger(__name__)

_QIDO_KEY = {
    "accession": "AccessionNumber",
    "patient_id": "PatientID",
    "study_uid": "StudyInstanceUID",
}
_STUDY_FIELDS = "00080061,00201206,00201208"  # ModalitiesInStudy, related series, instances


class DicomwebRetriever(ReceivesHere):
    """QIDO-RS to plan, WADO-RS to retrieve: each instance of the multipart stream goes to a
    receiver in this process, exactly as a C-STORE would (refused unless expected, de-identified,
    spooled), and is counted; the pull verifies the count against QIDO's."""

    protocol = "dicomweb"
    errors = DicomwebError

    def __init__(self, name: str, client: DicomwebClient, cfg: ReceiverConfig, limit: int) -> None:
        self.name, self.client, self.cfg = name, client, cfg
        self.max_concurrent = max(1, limit)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.client.close()

    def echo(self) -> None:
        self._call(self.client.search, "studies", {"limit": "1"})

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        if any(w in value for w in "*?\\"):
            raise ValueError(f"{kind} must not contain wildcards (* ? \\)")
        key = _QIDO_KEY[kind]
        found = self._call(
            self.client.search, "studies", {key: value, "includefield": _STUDY_FIELDS}
        )
        hits = [_study_hit(d) for d in found]
        # Only exact matches count: a server may match fuzzily or case-insensitively.
        attr = {"accession": "accession", "patient_id": "patient_id", "study_uid": "study_uid"}
        return [h for h in hits if getattr(h, attr[kind]) == value]

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        params = {"includefield": "00201209"}  # NumberOfSeriesRelatedInstances
        found = self._call(self.client.search, f"studies/{study_uid}/series", params)
        return [_series_hit(study_uid, d) for d in found]

    def image_size(self, study_uid: str, series_uid: str) -> tuple[int, int, int, int] | None:
        """Rows, columns, bits, frames of one of the series' instances, if the server says."""
        path = f"studies/{study_uid}/series/{series_uid}/instances"
        params = {"limit": "1", "includefield": "00280010,00280011,00280100,00280008"}
        for d in self._call(self.client.search, path, params):
            rows, cols, bits = _int(d, "00280010"), _int(d, "00280011"), _int(d, "00280100")
            if rows and cols and bits:
                return rows, cols, bits, _int(d, "00280008") or 1
        return None

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        receiver = self.receiver
        ok = bad = 0
        caller = f"dicomweb:{self.name}"
        try:
            with self.in_use():
                for data in self.client.series_instances(study_uid, series_uid):
                    try:
                        status = receiver.on_store(_part10(data, caller))
                    except ValueError:  # not a DICOM file: counted as failed, the rest goes on
                        status = CANNOT_UNDERSTAND
                    except Exception as e:  # as a C-STORE's would: a failed instance
                        log.error("an instance from %s failed (%s)", caller, type(e).__name__)
                        status = CANNOT_UNDERSTAND
                    if status == SUCCESS:
                        ok += 1
                    else:
                        bad += 1
        except DicomwebError as e:
            raise SourceError(f"{self}: {e}") from None
        finally:
            receiver.on_release()  # what came whole is flushed and kept for the next attempt
        return RetrieveResult(status=SUCCESS, completed=ok, failed=bad)

    def __str__(self) -> str:
        return f"DICOMweb source {self.name} at {self.client.where}"


def _part10(data: bytes, caller: str) -> ReceivedInstance:
    """A DICOM Part 10 file as the receiver takes it: the dataset still encoded, with what its
    file meta says of it."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM Part 10 file")
    end = 144 + int.from_bytes(data[140:144], "little")  # after (0002,0000) group length
    meta = read_dataset(BytesIO(data[132:end]), False, True)
    syntax, sop_class = meta.get("TransferSyntaxUID"), meta.get("MediaStorageSOPClassUID")
    sop = meta.get("MediaStorageSOPInstanceUID")
    if not (syntax and sop_class and sop):
        raise ValueError("DICOM file meta without its transfer syntax or SOP")
    return ReceivedInstance(str(sop_class), str(sop), UID(str(syntax)), data[end:], caller)


def _int(d: dict[str, Any], tag: str) -> int | None:
    v = first(d, tag)
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _study_hit(d: dict[str, Any]) -> StudyHit:
    mods = values(d, "00080061")
    return StudyHit(
        study_uid=str(first(d, "0020000D") or ""),
        patient_id=str(first(d, "00100020") or ""),
        accession=str(first(d, "00080050") or ""),
        study_date=str(first(d, "00080020") or ""),
        modalities=tuple(str(m) for m in mods if m),
        n_series=_int(d, "00201206"),
        n_instances=_int(d, "00201208"),
    )


def _series_hit(study_uid: str, d: dict[str, Any]) -> SeriesHit:
    return SeriesHit(
        study_uid=study_uid,
        series_uid=str(first(d, "0020000E") or ""),
        modality=str(first(d, "00080060") or ""),
        series_number=_int(d, "00200011"),
        n_instances=_int(d, "00201209"),
    )
