"""The notebooks' forms in a real browser: a notebook served on 127.0.0.1 only to headless
Chromium, driven by Selenium through Debian's ``chromium`` and ``chromium-driver``.

Under ipywidgets 8 (the newest libraries, as on Kaggle) Voila serves it. Under ipywidgets 7 (the
Colab replica, ``make test-colab``) the classic notebook with widgetsnbextension 3.x serves it
and runs all its cells, as Colab's frontend renders 7.x widgets: tab titles, labels and help on
hover are checked there, where a form without ``set_title`` shows untitled tabs.

Notebook 03 is clicked: a tab, a checkbox and a number box, then Save Params; the parameters JSON
the kernel writes proves the click reached the kernel's configuration. Every notebook's form is
photographed: into ``docs/screenshots/<notebook>.png`` (ipywidgets 8) or
``docs/screenshots/ipywidgets7/<notebook>.png`` (ipywidgets 7) when UPDATE_SCREENSHOTS=1, into
the test's temporary folder otherwise.

Without chromium, chromedriver, selenium or the server the tests are skipped, except in CI (the
CI environment variable set), where they fail: ``.ci/run`` installs the Debian packages.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from colab_dreambooth.config.params import load_params, save_params
from widgets.compat import IPYWIDGETS_MAJOR

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = ("chromium", "/usr/bin/chromium")
CHROMEDRIVER = ("chromedriver", "/usr/bin/chromedriver")
SERVER_START = 90  # seconds for the server to answer
PAGE_READY = 180  # seconds for the notebook to run and its widgets to render
KERNEL_REPLY = 60  # seconds for a click's effect to reach a file
SCREENSHOT_WIDTH = 1000  # pixels; the README shows them at most this wide
SCREENSHOT_HEIGHT = 1400
# ipywidgets 7 pages: the classic notebook (Colab's widget generation); 8: Voila.
CLASSIC = IPYWIDGETS_MAJOR < 8
SERVER = "notebook" if CLASSIC else "voila"
TAB = ".p-TabBar-tab, .lm-TabBar-tab"  # phosphor (7) or lumino (8) tab bars


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


def _browser_tools() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skip (fail in CI) when anything is missing."""
    missing = []
    chromium, driver = _find(CHROMIUM), _find(CHROMEDRIVER)
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    for module in ("selenium", SERVER):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} (pip install -e '.[test]')")
    if missing:
        message = "browser test needs " + ", ".join(missing)
        if _in_ci():
            pytest.fail(message + " (CI is set: .ci/run installs them)")
        pytest.skip(message)
    return chromium, driver


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Selenium, for this module's tests."""
    chromium, driver_path = _browser_tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,1400", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(PAGE_READY)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """A WORK_DIR as notebook 01 leaves it: the demo subject, class images and params.json."""
    from widgets.workdir import params_file, prepare_config

    # A short path: it shows in the screenshots' path boxes.
    root = Path(tempfile.mkdtemp(prefix="cdb-"))
    work = root / "dreambooth"
    config, _ = prepare_config(work, base_model="tiny", instance_prompt="x", class_prompt="",
                               resolution=64, demo_if_empty=True)
    save_params(config, params_file(work))
    yield work
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _keep_params(work) -> Iterator[None]:
    """Each test starts from notebook 01's params.json, whatever the one before saved."""
    params = work / "params.json"
    saved = params.read_bytes()
    yield
    params.write_bytes(saved)


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: the README's folder when UPDATE_SCREENSHOTS=1, else tmp."""
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        folder = SCREENSHOTS / "ipywidgets7" if CLASSIC else SCREENSHOTS
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


# ----------------------------------------------------------------------------- serving
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parameterized_copy(name: str, values: dict, folder: Path) -> Path:
    """The notebook with a cell assigning ``values`` after its parameters cell (papermill's
    way), written into ``folder``."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    path = folder / name
    nbformat.write(nb, path)
    return path


@contextlib.contextmanager
def serve(notebook: Path, folder: Path) -> Iterator[str]:
    """Serve ``notebook`` on 127.0.0.1 and a free port (Voila, or the classic notebook under
    ipywidgets 7); yield its URL. The server and its kernel are always killed (their own
    process group) on the way out."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        OMP_NUM_THREADS="1", JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
        JUPYTER_CONFIG_DIR=str(folder / "config"), JUPYTER_DATA_DIR=str(folder / "data"),
        IPYTHONDIR=str(folder / "ipython"), JUPYTER_PLATFORM_DIRS="1")
    log = open(folder / "server.log", "wb")
    if CLASSIC:
        command = ["-m", "notebook", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                   "--NotebookApp.token=", "--NotebookApp.password=", "--allow-root",
                   f"--notebook-dir={notebook.parent}"]
        url = f"http://127.0.0.1:{port}/notebooks/{notebook.name}"
    else:
        command = ["-m", "voila", str(notebook), "--no-browser", f"--port={port}",
                   "--Voila.ip=127.0.0.1", "--show_tracebacks=True",
                   "--VoilaConfiguration.http_keep_alive_timeout=5"]
        url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, *command], cwd=folder, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START
        while True:
            if server.poll() is not None:
                raise AssertionError(f"{SERVER} exited with {server.returncode}:\n"
                                     + (folder / "server.log").read_text(errors="replace"))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{SERVER} did not listen within {SERVER_START} s")
                time.sleep(0.5)
        yield url
    finally:
        _kill_group(server)
        log.close()


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it shuts its kernels down), then SIGKILL whatever is
    left of it and of its kernels (jupyter_client starts each in a session of its own)."""
    kernels = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid, started in kernels:
        if _start_time(pid) == started:  # still that process, not a new one with its pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None  # starttime: tells a reused pid apart


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the processes ``pid`` and its children started (Linux /proc;
    [] elsewhere)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


# ----------------------------------------------------------------------------- the page
def open_notebook(driver, url: str, ready_text: str, folder: Path) -> None:
    """Load the page and wait (bounded) until a widget showing ``ready_text`` is rendered."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    if CLASSIC:  # the classic notebook shows the notebook: run all its cells, as a user does
        WebDriverWait(driver, SERVER_START, poll_frequency=0.5).until(lambda d: d.execute_script(
            "return !!(window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel"
            " && Jupyter.notebook.kernel.is_connected())"))
        driver.execute_script("Jupyter.notebook.execute_all_cells()")
    try:
        WebDriverWait(driver, PAGE_READY, poll_frequency=0.5).until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('.jupyter-widgets')].some("
                "e => e.textContent.includes(arguments[0]))", ready_text))
    except TimeoutException:
        driver.save_screenshot(str(folder / "timeout.png"))
        log = (folder / "server.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"no widget showing {ready_text!r} within {PAGE_READY} s; "
                             f"{SERVER} log:\n{log}") from None
    time.sleep(1.0)  # let the last outputs of the same cell render


def click_text(driver, css: str, text: str) -> None:
    """Click the visible element matching ``css`` whose text starts with ``text``."""
    for element in driver.find_elements("css selector", css):
        if element.is_displayed() and element.text.strip().startswith(text):
            element.click()
            return
    raise AssertionError(f"no visible {css} with text {text!r}")


def field_input(driver, label: str):
    """The input of the form field labelled ``label`` (a text box or a checkbox)."""
    from selenium.webdriver.common.by import By

    xpath = (f"//div[contains(@class,'widget-inline-hbox')][.//label[normalize-space()="
             f"'{label}'] or .//span[normalize-space()='{label}']]//input")
    for element in driver.find_elements(By.XPATH, xpath):
        if element.is_displayed():
            return element
    raise AssertionError(f"no visible field labelled {label!r}")


def assert_help_on_hover(driver, label: str, help_starts: str) -> None:
    """The field labelled ``label`` shows help starting with ``help_starts`` on hover (the
    browser's tooltip: a ``title`` on its label, as 7's description_tooltip and 8's tooltip
    set it, or on its row)."""
    title = driver.execute_script(
        "const l = [...document.querySelectorAll('.widget-inline-hbox label, "
        ".widget-inline-hbox .widget-label')].find(e => e.textContent.trim() === arguments[0]"
        " && e.offsetParent !== null);"
        "if (!l) return null; const row = l.closest('.widget-inline-hbox');"
        "return l.title || (l.querySelector('[title]') || {}).title || row.title || '';",
        label)
    assert title is not None, f"no visible label {label!r}"
    assert title.startswith(help_starts), f"{label!r} shows help {title!r}"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = KERNEL_REPLY) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.25)


def form_screenshot(driver, marker: str, path: Path) -> Path:
    """Photograph the outermost widget holding ``marker`` (the notebook's form) as a small PNG:
    at most SCREENSHOT_WIDTH x SCREENSHOT_HEIGHT pixels, 256 colours."""
    from PIL import Image

    if CLASSIC:  # the notebook scrolls inside #site: photograph the element itself
        driver.set_window_size(1100, 4000)
        time.sleep(1.0)
        element = driver.execute_script(
            "const e = [...document.querySelectorAll('.jupyter-widgets.widget-vbox')].find("
            "  e => e.textContent.includes(arguments[0])); if (e) e.scrollIntoView(); return e;",
            marker)
        assert element is not None, f"no widget holding {marker!r}"
        png = element.screenshot_as_png
        driver.set_window_size(1100, 1400)
        return _small_png(Image.open(io.BytesIO(png)).convert("RGB"), path)
    # Voila's page scrolls inside the window and draws only what is in it: make the window
    # taller than the form, and let Lumino lay the tabs and accordions out again.
    driver.set_window_size(1100, 4000)
    time.sleep(1.5)
    rect = driver.execute_script(
        "const e = [...document.querySelectorAll('.jupyter-widgets.widget-vbox')].find("
        "  e => e.textContent.includes(arguments[0]));"
        "if (!e) return null;"
        "const r = e.getBoundingClientRect();"
        "return {x: r.left + window.scrollX, y: r.top + window.scrollY,"
        "        width: r.width, height: r.height};", marker)
    assert rect is not None, f"no widget holding {marker!r}"
    rect["height"] = min(rect["height"], SCREENSHOT_HEIGHT * 1.5)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "clip": {**{k: float(v) for k, v in rect.items()}, "scale": 1}})
    driver.set_window_size(1100, 1400)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    return _small_png(image, path)


def _small_png(image, path: Path) -> Path:
    """``image`` at most SCREENSHOT_WIDTH x SCREENSHOT_HEIGHT, in 256 colours, saved."""
    from PIL import Image

    if image.width > SCREENSHOT_WIDTH:
        image = image.resize((SCREENSHOT_WIDTH, round(image.height * SCREENSHOT_WIDTH
                                                      / image.width)), Image.LANCZOS)
    image = image.crop((0, 0, image.width, min(image.height, SCREENSHOT_HEIGHT)))
    image.quantize(256).save(path, optimize=True)
    return path


# ----------------------------------------------------------------------------- tests
def test_train_form_renders_and_a_click_changes_the_kernels_config(browser, work, shots,
                                                                   tmp_path):
    page = _parameterized_copy("03_train.ipynb", {"BASE_MODEL": "tiny", "WORK_DIR": str(work)},
                               tmp_path)
    params = work / "params.json"
    before = load_params(params)
    assert before.hflip is True and before.max_train_steps != 7
    with serve(page, tmp_path) as url:
        open_notebook(browser, url, "Training Steps", tmp_path)
        text = browser.find_element("tag name", "body").text
        tabs = [t.text.strip() for t in browser.find_elements("css selector", TAB)]
        assert tabs[:6] == ["Model", "Parameters", "Advanced", "Concepts", "Saving", "Sampling"]
        assert "Base model" in text and "Save Params" in text and "Train" in text
        assert "No problems found: ready to train" in text

        click_text(browser, TAB, "Parameters")
        assert_help_on_hover(browser, "Training Steps", "Total optimizer steps")
        form_screenshot(browser, "Params file", shots / "03_train.png")
        steps = field_input(browser, "Training Steps")  # visible only in its tab
        flip = field_input(browser, "Apply Horizontal Flip")
        assert flip.is_selected()
        flip.click()
        steps.clear()
        steps.send_keys("7")
        click_text(browser, TAB, "Concepts")
        assert field_input(browser, "Instance prompt").get_attribute("value") == "[filewords]"
        click_text(browser, "button", "Save Params")
        wait_for(lambda: load_params(params).hflip is False, "the saved params to show the "
                 "unticked Apply Horizontal Flip")
        wait_for(lambda: load_params(params).max_train_steps == 7, "Training Steps 7 saved")
        assert "Saved" in browser.find_element("tag name", "body").text
    after = load_params(params)
    assert after == before.copy(hflip=False, max_train_steps=7)  # nothing else changed


@pytest.mark.parametrize("name, values, marker, labels", [
    ("01_prepare_data.ipynb", {"INSTANCE_PROMPT": "[filewords]", "CLASS_PROMPT": "[filewords]",
                               "INSTANCE_TOKEN": "zwx", "CLASS_TOKEN": "a toy, toy",
                               "NUM_CLASS_IMAGES": 12, "RESOLUTION": 64}, "Params file",
     ["Model name", "Base model", "Instance prompt", "Class prompt", "Instance Token"]),
    ("02_generate_class_images.ipynb", {"NUM_CLASS_IMAGES": 14, "CLASS_STEPS": 2},
     "Generate class images",
     ["Class prompt", "Total Number of Class/Reg Images", "Classification CFG Scale",
      "Classification Steps", "12 of 14 class images", "2 to generate"]),
    ("04_test_and_export.ipynb", {"N_SAMPLES": 1, "SAMPLE_STEPS": 2}, "Export and send",
     ["Sample prompt", "Generate samples", "Half precision (fp16)", "Write a model card",
      "Dehydrate", "Send to", "found"]),
])
def test_notebook_form_renders(browser, work, shots, tmp_path, name, values, marker, labels):
    if name.startswith("04"):
        _train_once(work)
    if name.startswith("01"):
        values = {**values, "INSTANCE_DIR": str(work / "data" / "instance")}
    page = _parameterized_copy(name, {"BASE_MODEL": "tiny", "WORK_DIR": str(work), **values},
                               tmp_path)
    with serve(page, tmp_path) as url:
        open_notebook(browser, url, marker, tmp_path)
        text = browser.find_element("tag name", "body").text  # what is visible
        titles = [t.text.strip() for t in browser.find_elements("css selector", TAB)]
        assert all(titles) and (titles or name.startswith("04")), f"untitled tabs: {titles}"
        if name.startswith("01"):
            assert titles[:2] == ["Model", "Concepts"]
            click_text(browser, TAB, "Concepts")
            text += browser.find_element("tag name", "body").text
            assert "Concept 1: [filewords]" in text  # the accordion's page title
            assert_help_on_hover(browser, "Instance prompt", "The prompt that calls")
        for label in labels:
            assert label in text, label
        form_screenshot(browser, marker, shots / name.replace(".ipynb", ".png"))
    if name.startswith("02"):  # showing the form generated nothing
        assert load_params(work / "params.json").concepts_list[0].num_class_images == 12


def _train_once(work: Path) -> None:
    """A 2-step tiny model in ``work``, as notebook 03 leaves it (for notebook 04's page)."""
    from colab_dreambooth.training.train import train

    config = load_params(work / "params.json")
    if not (config.model_dir / "model" / "model_index.json").is_file():
        train(config.copy(max_train_steps=2), progress=False)


def test_a_missing_browser_skips_here_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_find", lambda names: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium.*chromedriver"):
        _browser_tools()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        _browser_tools()
