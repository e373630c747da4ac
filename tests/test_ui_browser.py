"""The /ui page in a real browser: Debian's chromium, headless, driven through chromedriver (selenium),
against a real `bentoml serve` of the default model. What the page renders is checked against what the
API answers over HTTP for the same image and arguments, and a full-page screenshot is taken (into the
test's temporary folder; with CAPT_UPDATE_SCREENSHOT=1 into results/ui/try-it.png, the README's picture:
a test run does not rewrite a tracked file unless asked).

Needs `chromium` and `chromedriver` (`make test` installs them with apt-get when it runs as root);
without them these tests skip and say so."""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tools.launch import REPO_ROOT, bentoml_serve

EXAMPLE = REPO_ROOT / "examples" / "blue-triangle.png"
SCREENSHOT = REPO_ROOT / "results" / "ui" / "try-it.png"
SHAPES = ["triangle", "circle", "square", "star"]
COLOURS = ["red", "green", "blue", "yellow"]
EPS_255 = 4  # the page's default eps
API_KEY = "ui-test-key-0123456789"
WAIT = 60  # seconds for anything the page waits on the server for


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (not found on PATH): `make browser` installs them "
                    "when run as root with apt-get, or `apt-get install -y chromium chromium-driver`")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    # The driver and browser are given by path: Selenium Manager has nothing to look up, and must not go online.
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (requirements-test.txt)")
    from selenium.webdriver.chrome.service import Service
    chromium, chromedriver = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                 "--disable-extensions", "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-default-apps", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def ui_server(browser, default_bundle, tmp_path_factory):
    with bentoml_serve(default_bundle, tmp_path_factory.mktemp("ui-server") / "serve.log") as running:
        yield running


def _wait(driver, condition, message):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d), message)


def _text(driver, element_id) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id).text


def _severe_console(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _open(driver, url):
    driver.get(f"{url}/ui")  # the redirect to /ui/ is part of what is tested
    assert urlsplit(driver.current_url).path == "/ui/"


def _choose(driver, image: Path, labels: str):
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, "file").send_keys(str(image))
    _wait(driver, lambda d: "×" in _text(d, "file-info"), "the page did not read the image")
    box = driver.find_element(By.ID, "labels")
    box.clear()
    box.send_keys(labels)


def _click(driver, element_id):
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, element_id).click()


def _classify_over_http(url, labels, headers=None):
    files = [("images", (EXAMPLE.name, EXAMPLE.read_bytes(), "image/png"))]
    return httpx.post(f"{url}/classify", files=files, data={"labels": json.dumps(labels), "top_k": str(len(labels))},
                      headers=headers, timeout=WAIT)


def _rendered_ranking(driver) -> list[tuple[str, float]]:
    """Read in one script: the list is replaced as a whole when an answer comes."""
    rows = driver.execute_script("return [...document.querySelectorAll('#results li.bar-row')]"
                                 ".map(li => [li.dataset.label, Number(li.dataset.probability)])")
    return [(label, probability) for label, probability in rows]


def _classify_in_page(driver, url, labels_text, labels):
    """Types the labels, clicks Classify, and checks the page's ranking against /classify's."""
    _choose(driver, EXAMPLE, labels_text)
    _click(driver, "classify")
    _wait(driver, lambda d: {label for label, _ in _rendered_ranking(d)} == set(labels)
          and d.find_element("id", "classify").is_enabled(), f"no ranking for {labels}")
    expected = _classify_over_http(url, labels).json()["predictions"][0]
    ranking = _rendered_ranking(driver)
    assert _text(driver, "top-label") == expected[0]["label"]
    assert [label for label, _ in ranking] == [p["label"] for p in expected]
    assert [p for _, p in ranking] == pytest.approx([p["probability"] for p in expected], abs=1e-4)
    return expected


def test_the_page_classifies_and_probes_as_the_api_does(browser, ui_server, tmp_path):
    driver, url = browser, ui_server.url
    _open(driver, url)
    page = httpx.get(f"{url}/ui/")
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert httpx.get(f"{url}/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{url}/ui/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{url}/ui/index.html").status_code == 404  # three files, no directory behind them
    assert httpx.get(f"{url}/").status_code == 200  # BentoML's own docs stay at /

    info = httpx.post(f"{url}/info", json={}, timeout=WAIT).json()
    _wait(driver, lambda d: _text(d, "model-name") == info["model"] if d.find_elements("id", "model-name") else False,
          "the model's name from /info is not shown")

    # Labels comma separated, then one per line.
    _classify_in_page(driver, url, ", ".join(SHAPES), SHAPES)
    _classify_in_page(driver, url, "\n".join(COLOURS), COLOURS)

    # The probe, with the page's default eps (4/255) and arguments; the same probe over HTTP (seeded).
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    assert Select(driver.find_element(By.ID, "eps")).first_selected_option.get_attribute("value") == str(EPS_255)
    _click(driver, "probe")
    _wait(driver, lambda d: d.find_element(By.ID, "probe-result").is_displayed() and
          d.find_elements(By.CSS_SELECTOR, "#curve circle.point"), "no probe result rendered")
    data = {"labels": json.dumps(COLOURS), "eps": repr(EPS_255 / 255), "steps": "10", "seed": "0", "attack": "apgd",
            "space": "input", "return_images": "true", "search_eps": "true"}
    response = httpx.post(f"{url}/probe", files=[("image", (EXAMPLE.name, EXAMPLE.read_bytes(), "image/png"))],
                          data=data, timeout=WAIT)
    assert response.status_code == 200, response.text
    probe = response.json()
    search = probe["eps_search"]
    verdict = driver.find_element(By.ID, "verdict")
    assert verdict.get_attribute("data-flipped") == str(probe["flipped"]).lower()
    assert ("Flipped" if probe["flipped"] else "Held") in verdict.text
    assert _text(driver, "probe-flipped") == str(probe["flipped"]).lower()
    assert _text(driver, "probe-eps") == f"{probe['eps_255']:g}/255"
    assert _text(driver, "smallest-flipping-eps") == (f"{search['smallest_flipping_eps_255']:g}/255"
                                                      if search["smallest_flipping_eps_255"] is not None else "none within the grid")
    assert _text(driver, "largest-holding-eps") == f"{search['largest_holding_eps_255']:g}/255"
    # The curve: eps 0 (the clean margin) and every eps the search tried, with its margin.
    points = sorted([(0.0, probe["margin_clean"])] + [(p["eps_255"], p["margin"]) for p in search["grid"] + search["bisection"]])
    drawn = [(float(c.get_attribute("data-eps-255")), float(c.get_attribute("data-margin")))
             for c in driver.find_elements(By.CSS_SELECTOR, "#curve-svg circle.point[data-eps-255]")]
    assert [e for e, _ in drawn] == [e for e, _ in points]
    assert [m for _, m in drawn] == pytest.approx([m for _, m in points], abs=1e-3)
    assert driver.find_elements(By.CSS_SELECTOR, "#curve-svg polyline.curve-line")
    # The images: the adversarial PNG the API returns, and the perturbation the page computed from it.
    adversarial = driver.find_element(By.ID, "adv-canvas")
    assert (adversarial.get_attribute("width"), adversarial.get_attribute("height")) == ("64", "64")
    perturbation = driver.find_element(By.ID, "pert-canvas")
    assert perturbation.get_attribute("data-source") == "page"
    assert int(perturbation.get_attribute("data-k")) == 127 // EPS_255
    assert float(perturbation.get_attribute("data-linf255")) == probe["linf_distance_255"]  # δ as the server measured it
    assert f"·{127 // EPS_255} + 128" in _text(driver, "pert-caption")
    assert driver.execute_script(
        "const c = document.getElementById('pert-canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] !== 128 || d[i+1] !== 128 || d[i+2] !== 128) n++; return n;") > 0
    assert driver.find_element(By.ID, "error").is_displayed() is False

    # Nothing went anywhere but this server, and the check saw the page's own API calls.
    origin = driver.execute_script("return location.origin")
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(origin + "/") for name in resources), resources
    assert {f"{origin}/info", f"{origin}/classify", f"{origin}/probe", f"{origin}/ui/app.js"} <= set(resources)
    assert _severe_console(driver) == []

    _screenshot(driver, SCREENSHOT if os.environ.get("CAPT_UPDATE_SCREENSHOT") == "1" else tmp_path / "try-it.png")


def _screenshot(driver, path: Path):
    """The whole page, not only the window."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def test_the_page_shows_the_api_s_errors(browser, ui_server):
    driver, url = browser, ui_server.url
    _open(driver, url)
    driver.get_log("browser")  # drop what came before
    # This time the image is dropped on the drop zone (a synthetic drop event carrying the file).
    driver.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const data = new DataTransfer(); data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));",
        base64.b64encode(EXAMPLE.read_bytes()).decode())
    _wait(driver, lambda d: _text(d, "file-info").startswith("dropped.png · 64×64"), "the dropped image was not taken")
    from selenium.webdriver.common.by import By
    labels = driver.find_element(By.ID, "labels")
    labels.clear()
    labels.send_keys("red, red")
    _click(driver, "classify")
    _wait(driver, lambda d: d.find_element("id", "error").is_displayed(), "a refused classify left no message")
    expected = _classify_over_http(url, ["red", "red"])
    assert expected.status_code == 400
    assert expected.json()["error"] in _text(driver, "error") and "HTTP 400" in _text(driver, "error")
    # The only console error is the browser's own note of that 400.
    assert all("400" in message for message in _severe_console(driver))


@pytest.mark.skipif(not (REPO_ROOT / "serving" / "auth.py").exists(), reason="needs serving/auth.py")
def test_with_an_api_key_the_page_says_401_without_it_and_works_with_it(browser, default_bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    driver = browser
    with bentoml_serve(default_bundle, tmp_path / "serve.log", {"CAPT_API_KEY": API_KEY}) as server:
        assert httpx.post(f"{server.url}/info", json={}).status_code == 401
        _open(driver, server.url)  # the page itself needs no key
        _wait(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), "no message for the 401 from /info")
        assert "401" in _text(driver, "error") and "API key" in _text(driver, "error")
        _choose(driver, EXAMPLE, ", ".join(SHAPES))
        _click(driver, "classify")
        _wait(driver, lambda d: "401" in _text(d, "error") and "needs an API key" in _text(d, "error"),
              "no 401 message for classify")
        assert _rendered_ranking(driver) == []

        key = driver.find_element(By.ID, "api-key")
        key.send_keys(API_KEY, Keys.TAB)  # "change": stored, and /info read again with it
        _wait(driver, lambda d: d.find_elements(By.ID, "model-name") and not d.find_element(By.ID, "error").is_displayed(),
              "the key did not clear the 401")
        assert driver.execute_script("return sessionStorage.getItem('capt-api-key')") == API_KEY
        assert driver.execute_script("return localStorage.length") == 0
        _click(driver, "classify")
        _wait(driver, lambda d: _rendered_ranking(d), "no ranking with the key")
        expected = _classify_over_http(server.url, SHAPES, headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert _text(driver, "top-label") == expected["predictions"][0][0]["label"]
        assert not driver.find_element(By.ID, "error").is_displayed()
        driver.execute_script("sessionStorage.clear()")
