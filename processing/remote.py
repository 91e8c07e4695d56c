"""A project's series as a MONAI dataset read through `sphere serve`, from any machine with a
token: the same `MetaTensor`s as `SeriesDataset` (same values, affine and meta), with no store,
catalog or vault beside it. The server checks the token's role and audits each series read
(gateway/web/routes/dataset.py); the stored values come as raw bytes, straight into the
volume's array (no copy of the body in memory)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
from monai.data import Dataset as MonaiDataset
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

from core.errors import SphereError
from processing.tensor import volume_tensor


class RemoteError(SphereError):
    """The server refused or failed a request (its status and its one-line reason)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status


class Client:
    """The few requests a remote dataset makes, with the bearer token."""

    def __init__(self, url: str, project: str, token: str, timeout_s: float = 120.0) -> None:
        self.base = f"{url.rstrip('/')}/api/projects/{quote(project, safe='')}"
        self.token = token
        self.timeout_s = timeout_s

    def open(self, path: str) -> Any:
        req = urllib.request.Request(
            self.base + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)  # noqa: S310 - http(s)
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("detail", e.reason)
            except ValueError:
                detail = e.reason
            raise RemoteError(e.code, str(detail)) from None

    def json(self, path: str) -> Any:
        with self.open(path) as r:
            return json.loads(r.read())

    def series(self, modality: str | None) -> list[dict[str, Any]]:
        return self.json("/series?" + urlencode({"modality": modality or ""}))

    def load(self, series_uid: str, **kw: Any) -> MetaTensor:
        """One series as `load_series` gives it (kw: device, channel_first, checksum)."""
        uid = quote(series_uid, safe="")
        attrs = self.json(f"/series/{uid}")
        stored = np.empty(attrs["shape"], dtype=np.dtype(attrs["dtype"]).newbyteorder("<"))
        view = stored.reshape(-1).view(np.uint8).data  # the array's own bytes, written into
        with self.open(f"/series/{uid}/volume") as r:
            got = 0
            while got < len(view):
                n = r.readinto(view[got:])
                if not n:
                    raise RemoteError(502, "the series' values ended early")
                got += n
        return volume_tensor(stored, attrs, attrs["storage_key"], **kw)


class LoadRemoteSeriesd(MapTransform):
    """MONAI dictionary transform: `d["series_uid"]` -> `d["image"]`, read through the server."""

    def __init__(self, client: Client, *, output: str = "image", device: str | None = None) -> None:
        super().__init__(["series_uid"])
        self.client = client
        self.output = output
        self.device = device

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        d[self.output] = self.client.load(d["series_uid"], device=self.device)
        return d


class RemoteSeriesDataset(MonaiDataset):
    """`SeriesDataset` over HTTP: `RemoteSeriesDataset("https://sphere.example.org", "proj",
    token)`, one item per complete series of `modality` (None: every series with images),
    {"storage_key", "series_uid", "study_uid", "modality", "image"}, read when the item is."""

    def __init__(
        self,
        url: str,
        project: str,
        token: str,
        transform: Any = None,
        *,
        modality: str | None = "CT",
        device: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        client = Client(url, project, token, timeout_s)
        items = client.series(modality)
        load = LoadRemoteSeriesd(client, device=device)
        super().__init__(items, transform=Compose([load, transform]) if transform else load)
