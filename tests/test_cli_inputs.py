"""The bad inputs a trial met, each one clear line and exit 2 with nothing created; and the
cohort CSVs spreadsheets write (UTF-16, semicolons, tabs), read."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest
from typer.testing import CliRunner

from core import Core, ProjectError, Settings
from core.projects import read_cohort_csv
from gateway.cli import app
from harness.localpacs import free_port
from tests.test_cli import SPHERE, first_admin, one_error_line, sphere

ROWS = [("ACC-1", "P1"), ("ACC-2", "P2")]


@pytest.mark.parametrize(
    "encoding,sep",
    [("utf-8", ","), ("utf-8-sig", ";"), ("utf-16", ";"), ("utf-16", "\t"), ("cp1252", ";")],
)
def test_spreadsheet_csvs_are_read(tmp_path, encoding, sep):
    text = f"AccessionNumber{sep}Patient ID\r\n" + "".join(f"{a}{sep}{p}\r\n" for a, p in ROWS)
    if encoding == "cp1252":
        text = text.replace("Patient ID", "Patient ID (n°)")  # a byte that is no UTF-8
    f = tmp_path / "cohort.csv"
    f.write_bytes(text.encode(encoding))
    got = read_cohort_csv(f)
    if encoding == "cp1252":
        assert got == {"accession": ["ACC-1", "ACC-2"]}  # "Patient ID (n°)" is no known column
    else:
        assert got == {"accession": ["ACC-1", "ACC-2"], "patient_id": ["P1", "P2"]}


def test_a_csv_with_a_header_and_no_rows_adds_nothing(tmp_path):
    sphere("project", "create", "hdr", home=tmp_path)
    for content in (b"accession\r\n", "accession;patient_id\r\n;\r\n".encode("utf-16")):
        (tmp_path / "empty.csv").write_bytes(content)
        with pytest.raises(ProjectError, match="no values"):
            read_cohort_csv(tmp_path / "empty.csv")
        out = sphere("cohort", "add", "hdr", "--csv", str(tmp_path / "empty.csv"),
                     home=tmp_path, check=False)  # fmt: skip
        assert "empty.csv has a header but no values under it" in one_error_line(out)
    with Core(Settings(home=tmp_path)) as c:
        assert c.catalog.cohort(c.project("hdr").id) == []
    # the control: the same file with a row adds it
    (tmp_path / "one.csv").write_bytes("accession;x\r\nA9;1\r\n".encode("utf-16"))
    out = sphere("cohort", "add", "hdr", "--csv", str(tmp_path / "one.csv"), home=tmp_path)
    assert "1 new accession" in out.stdout


@pytest.mark.parametrize(
    "value,said",
    [
        ('[{"name": "a", "password": "hunter2"', "SPHERE_SOURCES is not valid JSON"),
        ('{"password": "hunter2"}', "SPHERE_SOURCES: Input should be a valid list"),
        ('[{"password": "hunter2", "port": "x"}]', "SPHERE_SOURCES (item 0, port)"),
    ],
)
def test_malformed_sources_name_the_variable_not_the_value(tmp_path, value, said):
    home = tmp_path / "h"
    out = sphere("project", "create", "src", home=home, check=False, SPHERE_SOURCES=value)
    line = one_error_line(out)
    assert said in line and "hunter2" not in line
    assert not home.exists()


def test_a_home_that_is_a_file(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder")
    for args in (("project", "create", "xx"), ("status", "xx"), ("audit", "verify")):
        line = one_error_line(sphere(*args, home=home, check=False))
        assert f"{home} is a file, not a folder" in line
    below = home / "sub"
    line = one_error_line(sphere("project", "create", "xx", home=below, check=False))
    assert "is a file, not a folder" in line
    assert home.read_text() == "not a folder"


class HttpServer:
    """Answers every connection as a web server answers bytes it cannot parse."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def test_a_pacs_address_that_answers_http(tmp_path):
    http = HttpServer()
    env = {"SPHERE_PACS__PORT": str(http.port), "SPHERE_TIMEOUT_S": "20"}
    sphere("project", "create", "web-port", home=tmp_path)  # echo acts as a known operator
    first_admin(tmp_path)
    echo = sphere("echo", home=tmp_path, check=False, **env)
    assert "the peer answered in HTTP: is this its web port?" in echo.stdout
    assert "pacs did not answer" in one_error_line(echo)
    sphere("project", "approve", "web-port", "--committee-ref", "C", "--expires-on",
           "2099-01-01", home=tmp_path)  # fmt: skip
    sphere("cohort", "add", "web-port", "--accession", "ACC-1", home=tmp_path)
    line = one_error_line(sphere("pull", "web-port", home=tmp_path, check=False, **env))
    assert "answered in HTTP" in line and "ACC-1" not in line
    http.sock.close()
    # the control: a port where nothing answers says something else
    env["SPHERE_PACS__PORT"] = str(free_port())
    assert "HTTP" not in sphere("echo", home=tmp_path, check=False, **env).stdout


def test_verbose_after_the_command(tmp_path, monkeypatch):
    def broken(self, name):
        raise RuntimeError("where")

    sphere("project", "create", "vv", home=tmp_path)
    first_admin(tmp_path)
    monkeypatch.setattr(Core, "project", broken)
    env = {"SPHERE_HOME": str(tmp_path)}
    for args in (["status", "vv", "--verbose"], ["status", "-v", "vv"]):
        loud = CliRunner().invoke(app, args, env=env)
        assert isinstance(loud.exception, RuntimeError)  # the traceback, as --verbose asks
    quiet = CliRunner().invoke(app, ["status", "vv"], env=env)
    assert quiet.exit_code == 1 and "--verbose" in quiet.stderr
    out = subprocess.run(  # and as the executable: the command's own output, no usage error
        [*SPHERE, "status", "vv", "--verbose"], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "project vv" in out.stdout, out.stderr
