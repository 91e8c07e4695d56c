"""The headless-browser driver the viewer tests rely on (harness/browser.py), on a blank page."""

from __future__ import annotations

import pytest

from harness.browser import Browser, BrowserError, chromium_path

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")


def test_wait_for_ends_when_the_expression_is_an_element() -> None:
    """An element is truthy in JavaScript but comes back by value as {}: the wait ends all the
    same (it used to poll until its deadline once the viewer's canvas was there). Control: a
    false expression still runs out."""
    with Browser(timeout_s=30) as page:
        page.evaluate("document.body.appendChild(document.createElement('canvas')) && 1")
        wanted = "document.querySelector('canvas') || document.body.innerText.length > 50"
        assert page.wait_for(wanted, timeout_s=5) is True
        assert page.wait_for("document.querySelectorAll('canvas').length") == 1
        assert page.wait_for("Promise.resolve('ready')") == "ready"
        with pytest.raises(BrowserError, match="still false"):
            page.wait_for("document.querySelector('video') || 0", timeout_s=1)
