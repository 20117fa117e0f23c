"""The HTML validation report as a reviewer sees it: rendered by headless Chromium, not blank, figures in place."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.config import ReportConfig
from medtl.evaluate.report import build_report
from tests.test_report import HOSPITALS, make_context, make_predictions

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs headless Chromium at /usr/bin/chromium (Debian package `chromium`; `make test-services` installs it)")

WINDOW = (1280, 2400)


def _embedded_png(html: str, css_class: str, alt: str) -> Image.Image:
    """Decode the data-URI image with this class and alt text; fails the test when it is absent."""
    match = re.search(rf'<img class="{css_class}" src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="{alt}">', html)
    assert match, f"no embedded {alt!r} image in the report"
    return Image.open(io.BytesIO(base64.b64decode(match.group(1))))


def _screenshot(html_path: Path, tmp_path: Path) -> np.ndarray:
    png = tmp_path / "screenshot.png"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", html_path.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0 and png.is_file(), f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("L"), dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[str, np.ndarray]:
    tmp = tmp_path_factory.mktemp("render")
    predictions = make_predictions(image_dir=tmp_path_factory.mktemp("arrays"))
    result = build_report(predictions, make_context(), ReportConfig(n_bootstrap=100, pdf=False), tmp / "report")
    return result.html_path.read_text(encoding="utf-8"), _screenshot(result.html_path, tmp)


def test_screenshot_is_not_blank(rendered):
    _, gray = rendered
    assert gray.shape == (WINDOW[1], WINDOW[0])
    # a blank or failed page is one flat colour; the report has text, tables, cards and a coloured header
    assert gray.std() > 0.08, f"screenshot looks blank (grey-level std {gray.std():.3f})"
    assert (gray < 0.6).mean() > 0.01, "almost no dark pixels: the text did not render"
    # the page is laid out over its whole height, not cut off after the header
    for band in np.array_split(gray, 6):
        assert (band < 0.9).mean() > 0.002


def test_key_figures_and_tables_are_in_the_html(rendered):
    html, _ = rendered
    roc = _embedded_png(html, "roc", "ROC curves per hospital")
    calibration = _embedded_png(html, "calibration", "Calibration reliability diagrams per hospital")
    assert min(roc.size) > 300 and calibration.width > calibration.height > 200
    table = re.search(r'<table id="per-site-table">(.*?)</table>', html, re.S)
    assert table, "per-site table missing"
    for hospital in HOSPITALS:
        assert f'<td class="name">{hospital}</td>' in table.group(1)
    for table_id in ("operating-point-table", "subgroup-table", "shift-table", "adaptation-table", "tripod-table"):
        assert f'id="{table_id}"' in html, table_id
    assert html.count('alt="Most confident false') == 8
