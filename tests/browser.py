"""Pages opened in a real browser: Debian's Chromium driven by Playwright (``make system-deps``
installs Chromium; the ``dev`` extra Playwright), from ``file://`` with the network off."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@dataclass
class Browsed:
    """An open page, what it logged (``(type, text)``; uncaught errors as ``pageerror``) and the
    requests it made for anything not on ``file://`` (each refused)."""

    page: object
    console: list[tuple[str, str]] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [entry for entry in self.console if entry[0] in ("error", "pageerror")]

    def picture(self, selector: str) -> np.ndarray:
        """The element as drawn on the screen, ``(H, W, 3)`` uint8."""
        data = self.page.locator(selector).screenshot()
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))


@contextmanager
def browse(path: Path, fragment: str = "", width: int = 1400, height: int = 1000) -> Iterator[Browsed]:
    """``path`` opened in headless Chromium at ``width`` x ``height`` pixels, offline."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the dev extra)")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (make system-deps)")
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, offline=True)
            browsed = Browsed(context.new_page())

            def local_only(route):
                if route.request.url.startswith("file:"):
                    route.continue_()
                else:
                    browsed.remote.append(route.request.url)
                    route.abort()

            context.route("**/*", local_only)
            browsed.page.on("console", lambda message: browsed.console.append((message.type, message.text)))
            browsed.page.on("pageerror", lambda error: browsed.console.append(("pageerror", str(error))))
            browsed.page.goto(f"{path.as_uri()}{fragment}")
            yield browsed
        finally:
            browser.close()


def no_horizontal_scrolling(browsed: Browsed) -> bool:
    return browsed.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def viewer_ready(browsed: Browsed) -> None:
    """Waits for a case page's viewer (``body[data-ready]``) and fails unless it drew."""
    browsed.page.wait_for_function("document.body.hasAttribute('data-ready')", timeout=60_000)
    state = browsed.page.evaluate("document.body.getAttribute('data-ready')")
    assert state == "yes", (state, browsed.page.inner_text("#viewer-status"), browsed.console)


def settled(browsed: Browsed, selector: str = "#viewer-now") -> np.ndarray:
    """The canvas once a change has been drawn (two animation frames on)."""
    browsed.page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    return browsed.picture(selector)

