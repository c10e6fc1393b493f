"""`vtcbench report --format html` in a real browser: headless Chromium opens the page with
networking disabled, and the DOM it dumps must hold every table (header row and body rows),
the footnotes and every figure (a `data:image/png;base64` PNG), while its net log shows that
the page asked for nothing outside itself.

The run folders are those of tests/test_report.py. Skipped when no `chromium` (or
`chromium-browser`) is on PATH; CI installs Debian's chromium (.ci/run).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest
from test_report import results  # noqa: F401  (results: the run folders, a fixture)

from vtcbench.report import Report, ReportOptions, build_report, render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chromium-browser on PATH "
                                "(Debian: apt-get install --no-install-recommends chromium)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_PNG = "data:image/png;base64,"
#: Chromium's own traffic (component and extension updates, network time, Google sign-in, spell-check
#: dictionaries) switched off where a flag allows; what remains is told apart from the page's in the
#: net log. Every host name resolves to nothing and every connection goes to a closed local port.
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-features=NetworkTimeServiceQuerying,SpellcheckService,Translate,MediaRouter,OptimizationHints",
)

# the report's layouts, as tests/test_report.py selects them
LAYOUTS = {
    "efficiency": {},
    "inference": {"layout": "inference"},
    "compressors": {"layout": "compressors"},
    "ablation": {"methods": ("vanilla", "pdrop")},
    "sweep": {"runs": "*sweep*"},
}


# -- the page as Chromium sees it ----------------------------------------------------------------------


@dataclasses.dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = dataclasses.field(default_factory=list)
    text: str = ""

    def find_all(self, tag: str) -> list[Element]:
        found = []
        for child in self.children:
            if child.tag == tag:
                found.append(child)
            found += child.find_all(tag)
        return found

    def all_text(self) -> str:
        return self.text + "".join(child.all_text() for child in self.children)


class Tree(HTMLParser):
    """The dumped DOM as a tree (Chromium serializes it well formed: every element closed)."""

    VOID: ClassVar[set[str]] = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(Element("#text", {}, text=data))


def _texts(elements: list[Element]) -> list[str]:
    return [" ".join(e.all_text().split()) for e in elements]


def open_in_chromium(page: Path, work: Path) -> tuple[str, list[str]]:
    """(the DOM Chromium dumps after loading `page`, the URLs the page requested per the net log)."""
    net_log = work / "netlog.json"
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={work / 'profile'}", f"--log-net-log={net_log}",
               "--dump-dom", page.as_uri()]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "<html" in done.stdout, f"chromium exit {done.returncode}: {done.stderr[-3000:]}"
    return done.stdout, page_requests(net_log)


def page_requests(net_log: Path) -> list[str]:
    """The URLs of the URL requests the page made (file: and data: loads do not reach the net log).

    A request the page makes carries its origin as initiator (`null` for a file:// page) and the
    page's network isolation key (`file://`); Chromium's own background requests carry neither
    ("not an origin"), so they are left out."""
    text = net_log.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short: Chromium writes the closing brackets on exit
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] != start_job or "url" not in params:
            continue
        from_page = params.get("initiator", "not an origin") != "not an origin" or "file://" in params.get(
            "network_isolation_key", "")
        if from_page and not params["url"].startswith(("file:", "data:")):
            urls.append(params["url"])
    return urls


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG whose chunks are all intact (lengths, CRCs, IHDR first, IEND last)."""
    assert data.startswith(PNG_SIGNATURE), data[:16]
    offset, chunks, size = len(PNG_SIGNATURE), [], (0, 0)
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert len(body) == length and zlib.crc32(kind + body) == crc, f"damaged {kind!r} chunk"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        chunks.append(kind)
        offset += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks, chunks
    return size


def external_references(page: str) -> list[str]:
    """src / href / srcset values and CSS url()s of the html source that point outside the page."""
    found = []

    class References(HTMLParser):
        def handle_starttag(self, tag, attrs):
            for name, value in attrs:
                outside = value is not None and value.strip().lower().startswith(("http://", "https://", "//"))
                if outside and name in ("src", "href", "srcset", "action", "poster", "data"):
                    found.append(f"<{tag} {name}={value[:80]}>")

    References().feed(page)
    found += [f"url({target[:80]})" for target in re.findall(r"url\(\s*['\"]?([^'\")\s]*)", page, re.IGNORECASE)
              if not target.lower().startswith(("data:", "#"))]
    return found


# -- the tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_html_report_renders_whole_in_chromium_without_requests(results, tmp_path, layout):  # noqa: F811
    options = ReportOptions(results=results, **LAYOUTS[layout], plots=True)
    report: Report = build_report(options)
    if layout in ("efficiency", "inference", "compressors"):  # runs of several methods: the efficiency figures
        assert report.figures
    page = render(report, "html")
    assert external_references(page) == []
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")

    dom, requested = open_in_chromium(path, tmp_path)
    assert requested == [], f"the page requested {requested}"
    document = Tree(dom).root
    body = document.find_all("body")
    assert len(body) == 1

    tables = body[0].find_all("table")
    assert len(tables) == len(report.tables) > 0
    notes = [ul for ul in body[0].find_all("ul") if "notes" in ul.attrs.get("class", "").split()]
    for element, table in zip(tables, report.tables):
        head = element.find_all("thead")
        assert len(head) == 1 and len(head[0].find_all("tr")) == 1
        assert _texts(head[0].find_all("th")) == [" ".join(c.header.split()) for c in table.columns]
        rows = element.find_all("tbody")[0].find_all("tr")
        assert len(rows) == len(table.rows) > 0
        for row in rows:
            assert len(row.find_all("td")) == len(table.columns)
            assert all(text for text in _texts(row.find_all("td")))  # a missing cell is "-", never empty
    for table in report.tables:
        if table.footnotes:
            items = {text for ul in notes for text in _texts(ul.find_all("li"))}
            assert {" ".join(note.split()) for note in table.footnotes} <= items
    assert sum(bool(table.footnotes) for table in report.tables) == len(notes)
    if report.skipped:
        skipped = [ul for ul in body[0].find_all("ul") if "skipped" in ul.attrs.get("class", "").split()]
        assert len(skipped) == 1 and len(skipped[0].find_all("li")) == len(report.skipped)

    images = body[0].find_all("img")
    assert len(images) == page.count("<img")
    assert len(images) == len(report.figures)
    for image in images:
        source = image.attrs.get("src", "")
        assert source.startswith(DATA_PNG), source[:80]
        width, height = png_size(base64.b64decode(source[len(DATA_PNG):], validate=True))
        assert width > 0 and height > 0


def test_the_net_log_check_sees_a_page_that_reaches_out(tmp_path):
    """The check above is not blind: a page with one outside image is caught (its request fails)."""
    path = tmp_path / "outside.html"
    path.write_text('<!DOCTYPE html><html><body><img src="https://vtcbench.invalid/figure.png"></body></html>')
    _, requested = open_in_chromium(path, tmp_path)
    assert requested == ["https://vtcbench.invalid/figure.png"]
    assert external_references(path.read_text()) == ['<img src=https://vtcbench.invalid/figure.png>']
