"""The web page at `/` in a real headless Chromium, against `bfd serve` as a real process.

Debian's `chromium` driven by Playwright's Python package (`executable_path`: no browser download). Without
either the test skips loudly, unless `BFD_REQUIRE_BROWSER=1` (CI), where it fails. Every run leaves a full-page
screenshot in tests/artifacts/ (gitignored); docs/web-ui.png is one of them, copied by hand.

Both the page and /docs run under their Content-Security-Policy: any violation the browser reports (in its
console, or as a `securitypolicyviolation` event) fails the test, as does anything loaded from elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import httpx
import pytest
from factories import build_tiny_bundle

from loadtest.servers import bfd_serve

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

pytestmark = pytest.mark.slow

XRAY = Path(__file__).parent / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md
FIRST = XRAY / "hand" / "fractured" / "fracatlas_IMG0003396.jpg"  # FracAtlas, CC BY 4.0
SECOND = XRAY / "hand" / "normal" / "fracatlas_IMG0001587.jpg"  # FracAtlas, CC BY 4.0
ARTIFACTS = Path(__file__).parent / "artifacts"
VERSION = "0.0.1-test"  # build_tiny_bundle's default
# Runs before the page's own scripts (Playwright injects it outside the page's policy): every blocked load
# or inline script/style the policy refuses reaches the console, where the test collects it.
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) => console.error(
  `CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"} (${e.sourceFile}:${e.lineNumber})`));
"""


def _missing(reason: str) -> NoReturn:
    """Skip loudly, or fail where the browser is required (CI sets BFD_REQUIRE_BROWSER=1)."""
    message = f"WEB UI TEST NOT RUN: {reason}"
    if os.environ.get("BFD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (BFD_REQUIRE_BROWSER=1)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("BFD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not Path(path).is_file():
        _missing(f"no Chromium binary ({path or 'none on PATH'}): apt-get install chromium, or set BFD_CHROMIUM")
    if importlib.util.find_spec("playwright") is None:
        _missing("the playwright Python package is not installed (pip install playwright; no `playwright install`)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("web-ui")
    with bfd_serve(build_tiny_bundle(root / "bundle"), root) as served:
        yield served.url


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # the first analysis warms the service up
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _watch_policy(page: Page) -> list[str]:
    """The policy violations the page reports, collected as they happen."""
    violations: list[str] = []
    page.add_init_script(REPORT_VIOLATIONS)

    def seen(message: ConsoleMessage) -> None:
        if "CSP violation" in message.text or "Content Security Policy" in message.text:
            violations.append(message.text)

    page.on("console", seen)
    return violations


def _drop_files(page: Page, selector: str, *paths: Path) -> None:
    """A real drop: a DataTransfer built in the page holding File objects, dispatched as a drop event."""
    files = [[p.name, base64.b64encode(p.read_bytes()).decode()] for p in paths]
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, data] of files) {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const type = name.endsWith(".png") ? "image/png" : "image/jpeg";
                transfer.items.add(new File([bytes], name, { type }));
            }
            return transfer;
        }""",
        files,
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_page_analyses_uploads_and_lists_history(browser: Browser, server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    script_errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    # Works offline: everything the page loads is the service's own (or data:/blob: URLs it made).
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else foreign.append(r.url))
    violations = _watch_policy(page)
    try:
        response = page.goto(server)
        assert response is not None
        assert "script-src 'self'" in response.headers["content-security-policy"]

        # The header: disclaimer always visible, the model named, the untrained banner up.
        expect(page.get_by_test_id("disclaimer")).to_contain_text("Research use only")
        expect(page.get_by_test_id("model-info")).to_contain_text(VERSION)
        banner = page.get_by_test_id("untrained-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("UNTRAINED MODEL")

        # 1. Drag and drop.
        _drop_files(page, "[data-testid=drop-zone]", FIRST)
        reports = page.get_by_test_id("reports")
        expect(reports.get_by_test_id("report-card")).to_have_count(1)
        card = reports.get_by_test_id("report-card").first
        expect(card.get_by_test_id("report-name")).to_have_text(FIRST.name)
        expect(card.get_by_test_id("body-part")).to_have_text(re.compile(r"^(elbow|hand|shoulder) \d+\.\d%"))
        expect(card.get_by_test_id("fracture-probability")).to_have_text(re.compile(r"^\d+\.\d%$"))
        expect(card.get_by_test_id("fracture")).to_contain_text("threshold 50.0%")
        expect(card.get_by_test_id("model-version")).to_contain_text(VERSION)
        expect(card.get_by_test_id("card-untrained")).to_be_visible()
        expect(card.get_by_test_id("card-disclaimer")).to_contain_text("Research use only")
        expect(card.locator("[role=meter]")).to_have_attribute("aria-valuenow", re.compile(r"^[01]\.\d{3}$"))

        # The heatmap: overlay first, then the original (the uploaded file's object URL), then back.
        figure = card.get_by_test_id("heatmap")
        image = card.get_by_test_id("heatmap-image")
        expect(figure).to_have_attribute("data-view", "overlay")
        expect(image).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
        toggle = card.get_by_test_id("heatmap-toggle")
        toggle.click()
        expect(figure).to_have_attribute("data-view", "original")
        expect(image).to_have_attribute("src", re.compile(r"^blob:"))
        expect(toggle).to_have_attribute("aria-pressed", "false")
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        toggle.click()
        expect(figure).to_have_attribute("data-view", "overlay")

        # 2. The file input: the newer report goes on top.
        page.get_by_test_id("file-input").set_input_files(str(SECOND))
        expect(reports.get_by_test_id("report-card")).to_have_count(2)
        expect(reports.get_by_test_id("report-name")).to_have_text([SECOND.name, FIRST.name])
        _screenshot(page, "web-ui.png")

        # 3. Several files in one drop: a colour picture (the service abstains) and a file that is no image.
        _drop_files(page, "[data-testid=drop-zone]", _colour_picture(tmp_path), _not_an_image(tmp_path))
        abstained = reports.locator("[data-testid=report-card]", has_text="colour.png")
        expect(abstained.get_by_test_id("abstained")).to_contain_text("not a radiograph")
        expect(abstained.get_by_test_id("fracture-label")).to_have_class(re.compile(r"\bunusable\b"))
        expect(abstained.get_by_test_id("card-disclaimer")).to_contain_text("Research use only")
        # Not an image: a readable reason from the answer's `detail`, not a bare status.
        error = reports.get_by_test_id("upload-error")
        expect(error).to_contain_text("Not analysed:")
        assert "HTTP" not in error.inner_text()
        expect(reports.get_by_test_id("report-card")).to_have_count(3)

        # 4. History: the analyses, newest first; a row opens its stored report (grid, no overlay PNG).
        page.get_by_test_id("tab-history").click()
        rows = page.get_by_test_id("history-row")
        names = page.get_by_test_id("history-image-name")
        expect(names).to_have_text(["colour.png", SECOND.name, FIRST.name])
        expect(page.get_by_test_id("history-status")).to_contain_text("of 3")
        expect(page.get_by_test_id("history-newer")).to_be_disabled()
        expect(page.get_by_test_id("history-older")).to_be_disabled()
        expect(page.get_by_test_id("disclaimer")).to_be_visible()
        rows.nth(2).click()
        stored = page.get_by_test_id("history-detail").get_by_test_id("report-card")
        expect(stored.get_by_test_id("report-name")).to_have_text(FIRST.name)
        expect(stored.get_by_test_id("card-untrained")).to_be_visible()
        expect(stored.get_by_test_id("model-version")).to_contain_text(VERSION)
        expect(stored.get_by_test_id("heatmap-grid").locator("td")).to_have_count(49)
        expect(stored.get_by_test_id("card-disclaimer")).to_contain_text("Research use only")
        _screenshot(page, "web-ui-history.png")

        # The filter by image name.
        page.get_by_test_id("history-filter").fill(SECOND.name)
        page.get_by_test_id("history-filter").press("Enter")
        expect(names).to_have_text([SECOND.name])

        # Pagination (10 a page): 8 more analyses posted straight to the API make 11.
        for index in range(8):
            files = {"image": (f"batch-{index}.jpg", SECOND.read_bytes(), "image/jpeg")}
            assert httpx.post(f"{server}/api/analysis", files=files, timeout=60).status_code == 201
        page.get_by_test_id("history-filter").fill("")
        page.get_by_test_id("history-filter").press("Enter")
        expect(rows).to_have_count(10)
        expect(names.first).to_have_text("batch-7.jpg")
        page.get_by_test_id("history-older").click()
        expect(names).to_have_text([FIRST.name])
        expect(page.get_by_test_id("history-status")).to_contain_text("11–11 of 11")
        expect(page.get_by_test_id("history-older")).to_be_disabled()
        page.get_by_test_id("history-newer").click()
        expect(rows).to_have_count(10)
        expect(page.get_by_test_id("history-newer")).to_be_disabled()
    except BaseException:
        with contextlib.suppress(Exception):  # never hide the real failure behind a failed screenshot
            _screenshot(page, "web-ui-failure.png")
        raise
    finally:
        page.close()
    assert not script_errors, f"script errors on the page: {script_errors}"
    assert not foreign, f"the page loaded something from elsewhere (it must work offline): {foreign}"
    assert not violations, f"the page breaks its Content-Security-Policy {len(violations)} times: {violations[:3]}"


def test_docs_render_offline_under_their_policy(browser: Browser, server: str) -> None:
    """Swagger UI from the service's own files, its inline script allowed by hash: the operations show."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    script_errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else foreign.append(r.url))
    violations = _watch_policy(page)
    try:
        response = page.goto(f"{server}/docs")
        assert response is not None
        assert "'sha256-" in response.headers["content-security-policy"]
        expect(page.locator(".opblock-summary-path", has_text="/v1/predict").first).to_be_visible()
        expect(page.locator(".opblock-summary-path", has_text="/api/analysis").first).to_be_visible()
        expect(page.get_by_text("Unable to render this definition")).to_have_count(0)
        page.locator(".opblock-summary-path", has_text="/v1/models").first.click()  # an operation opens
        expect(page.get_by_role("button", name="Try it out").first).to_be_visible()
        _screenshot(page, "docs.png")
    finally:
        page.close()
    assert not script_errors, f"script errors on /docs: {script_errors}"
    assert not foreign, f"/docs loaded something from elsewhere (it must work offline): {foreign}"
    assert not violations, f"/docs breaks its Content-Security-Policy {len(violations)} times: {violations[:3]}"


def _screenshot(page: Page, name: str) -> None:
    # From the top: a full-page shot taken scrolled down paints the sticky header over the middle.
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _colour_picture(tmp_path: Path) -> Path:
    """Red and green halves: clearly not a radiograph, so the service abstains."""
    from PIL import Image

    picture = Image.new("RGB", (256, 256), (220, 30, 30))
    picture.paste((30, 200, 40), (128, 0, 256, 256))
    path = tmp_path / "colour.png"
    picture.save(path)
    return path


def _not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_bytes(b"these are notes, not a radiograph")
    return path
