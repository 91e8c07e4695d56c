"""A DICOMweb client for retrieval from a PACS: QIDO-RS searches and WADO-RS series, streamed.

Policy-free, like `gateway/dimse`: it takes a base URL, credentials, timeouts and retry counts,
and knows nothing of projects. Connections are kept alive (one pool per client, as many as the
caller's threads); TLS certificates are verified (against `ca_bundle` when given). A WADO-RS
series comes back as multipart/related parts parsed as they arrive, so a 500-slice series never
sits whole in memory. Failures raise `DicomwebError` with a status and a path, never a body.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import urllib3

from gateway.web.multipart import iter_parts

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# What to ask a source for, best first: the instances as it holds them (`*`: no transcoding,
# nothing lost; the receiver decodes what it can), else Explicit VR Little Endian, which any
# DICOMweb server must send and the gateway always reads. One syntax a request: given a q-list
# with `*` first, Orthanc sends Explicit VR LE (seen with Implicit VR LE originals) rather than
# the original, so the next is asked only when a server refuses one (400 or 406).
PREFERRED_SYNTAXES = ("*", EXPLICIT_VR_LITTLE_ENDIAN)
_REFUSED = (400, 406)


def dicom_accept(syntax: str) -> str:
    """The Accept header of a WADO-RS retrieval in one transfer syntax (`*`: as stored)."""
    return f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'


DICOM_PARTS = dicom_accept(PREFERRED_SYNTAXES[0])
log = logging.getLogger("gateway.web.client")
_CHUNK = 256 << 10
_MAX_INSTANCE = 1 << 30


class DicomwebError(Exception):
    """The DICOMweb server could not be reached, refused, or answered something unreadable."""


class DicomwebClient:
    """QIDO-RS and WADO-RS against one service root (e.g. https://pacs/dicom-web)."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        ca_bundle: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_connections: int = 4,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("a DICOMweb URL looks like https://host/dicom-web")
        self.url = url.rstrip("/")
        self.where = f"{parts.scheme}://{parts.netloc}"  # for messages: no path, no credentials
        self.headers = {"User-Agent": "sphere"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        elif username is not None:
            pair = f"{username}:{password or ''}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        retry = urllib3.Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff_s,
            status_forcelist=(429, 500, 502, 503, 504),  # 429 and 503: after Retry-After
            allowed_methods=("GET",),
            raise_on_status=False,
        )
        # The transfer syntaxes asked for, best first; one the server refuses is dropped for
        # good (remembered for this source, not asked again per series).
        self.syntaxes = list(PREFERRED_SYNTAXES)
        self._http = urllib3.PoolManager(
            num_pools=2,
            maxsize=max_connections,
            block=False,
            retries=retry,
            timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_bundle,
        )

    def search(self, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """A QIDO-RS search (`path` like "studies" or "studies/{uid}/series"): DICOM JSON
        datasets; an empty list for 204 No Content."""
        query = f"?{urlencode(params)}" if params else ""
        resp = self._get(path, query, {"Accept": "application/dicom+json"}, stream=False)
        if resp.status == 204 or not resp.data:
            return []
        try:
            found = json.loads(resp.data)
        except ValueError:
            raise DicomwebError(f"{self.where}: QIDO {path.split('/')[0]} is not JSON") from None
        if not isinstance(found, list):
            raise DicomwebError(f"{self.where}: QIDO {path.split('/')[0]} is not a JSON array")
        return found

    def series_instances(self, study_uid: str, series_uid: str) -> Iterator[bytes]:
        """Each instance of a series as DICOM Part 10 bytes, parsed from the stream as it
        arrives. A broken or truncated stream raises `DicomwebError` after what came whole."""
        path = f"studies/{quote(study_uid)}/series/{quote(series_uid)}"
        resp = None
        while resp is None:
            syntax = self.syntaxes[0]
            last = len(self.syntaxes) == 1
            accept = {"Accept": dicom_accept(syntax)}
            resp = self._get(path, "", accept, stream=True, refused=() if last else _REFUSED)
            if resp is None:
                with contextlib.suppress(ValueError):  # another thread dropped it first
                    self.syntaxes.remove(syntax)
                log.info("%s refuses transfer-syntax=%s: asking for the next", self.where, syntax)
        try:
            ctype = resp.headers.get("Content-Type", "")
            if not ctype.lower().startswith("multipart/related"):
                raise DicomwebError(f"{self.where}: WADO-RS answered {ctype or 'no type'}")
            chunks = resp.stream(_CHUNK, decode_content=True)
            for part in iter_parts(chunks, content_type=ctype, max_part_size=_MAX_INSTANCE):
                yield part.content
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            raise DicomwebError(
                f"{self.where}: WADO-RS stream broke ({type(e).__name__})"
            ) from None
        finally:
            resp.release_conn()

    def close(self) -> None:
        self._http.clear()

    def _get(
        self,
        path: str,
        query: str,
        headers: dict[str, str],
        *,
        stream: bool,
        refused: tuple[int, ...] = (),
    ) -> Any:
        """The response; None when its status is one of `refused` (the caller asks again)."""
        what = path.split("/")[0]
        try:
            resp = self._http.request(
                "GET",
                f"{self.url}/{path}{query}",
                headers={**self.headers, **headers},
                preload_content=not stream,
            )
        except urllib3.exceptions.HTTPError as e:
            reason = type(getattr(e, "reason", None) or e).__name__
            raise DicomwebError(f"{self.where} cannot be reached ({reason})") from None
        if resp.status in (401, 403):
            resp.release_conn()
            raise DicomwebError(f"{self.where} refused our credentials (HTTP {resp.status})")
        if resp.status in refused:
            resp.drain_conn()
            resp.release_conn()
            return None
        if resp.status >= 400:
            resp.release_conn()
            raise DicomwebError(f"{self.where}: {what} answered HTTP {resp.status}")
        return resp
