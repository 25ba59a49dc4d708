"""Both notebooks in JupyterLab, driven in headless Chromium as a person would use them: the forms render as
controls, a preset chosen in the page reaches the run, the bar reaches its end, tables and plots render, the
download link serves the file, and the console holds no widget errors. On failure a screenshot and the
console log are left in the test's temporary folder."""

import os
import re
import shutil
from pathlib import Path

import pytest

from jupyterlab_browser import JupyterLab, Notebook, chromium, missing

if missing() and os.environ.get("CI"):  # .ci/run installs what it needs: missing there is a failure
    raise RuntimeError(f"browser test cannot run in CI: {missing()}")
pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "ok")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def lab(tmp_path_factory):
    """A server per test: JupyterLab restores a workspace's open notebooks, and two kernels asking at once
    bring up a kernel dialog."""
    root = tmp_path_factory.mktemp("lab") / "root"
    root.mkdir()
    for notebook in ("extract_lora.ipynb", "resize_lora.ipynb"):
        shutil.copy(NOTEBOOKS / notebook, root / notebook)
    server = JupyterLab(root, env={"LORA_COLAB_WORKDIR": str(root / "work"), "LORA_COLAB_CACHE": str(root / "cache")})
    yield server
    server.close()


@pytest.fixture
def page(lab, tmp_path, request):
    driver = chromium(tmp_path / "downloads")
    opened = {}

    def open_notebook(name):
        opened["nb"] = Notebook(driver, lab, name)
        return opened["nb"]
    yield open_notebook
    failed = getattr(request.node, "rep_call", None)
    if opened and (failed is None or failed.failed):
        opened["nb"].save_evidence(tmp_path, request.node.name)
    driver.quit()


def text(element):
    """The element's text, rendered or not (off-screen cells may not be laid out)."""
    return element.get_attribute("textContent")


def widget_problems(element):
    """What would show a person a broken widget: an error box or a widget's text repr instead of a control."""
    text = element.get_attribute("textContent")
    return [bad for bad in ("Error displaying widget", "VBox(children", "IntSlider(", "Dropdown(") if bad in text]


def controls(element, css):
    from selenium.webdriver.common.by import By
    return element.find_elements(By.CSS_SELECTOR, css)


def widget_console_errors(nb):
    return [e["message"] for e in nb.console() if e["level"] in ("SEVERE", "WARNING")
            and re.search(r"widget|ipywidgets|jupyter-widgets", e["message"], re.I)]


def images_rendered(nb, output, timeout=15):
    """The images of an output that the browser has decoded (scrolled into view first; waits for them)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        shown = []
        for img in controls(output, "img"):
            nb.driver.execute_script("arguments[0].scrollIntoView()", img)
            if nb.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img):
                shown.append(img)
        if shown or time.monotonic() > deadline:
            return shown
        time.sleep(0.5)


def download_link(output):
    links = controls(output, "a[download]")
    assert len(links) == 1, output.text
    return links[0].get_attribute("href")


def test_extract_notebook_in_jupyterlab(page, lab):
    from selenium.webdriver.support.ui import Select

    nb = page("extract_lora.ipynb")
    nb.run(0, 3)
    form = nb.output(3)
    assert not widget_problems(form)
    assert len(controls(form, "select")) >= 4 and len(controls(form, ".widget-slider")) >= 2
    assert len(controls(form, "input[type=checkbox]")) == 2
    # the form lines up: every labelled control starts at the same x
    starts = [round(el.location["x"]) for el in controls(form, "select, input:not([type=checkbox]), .slider-container, "
                                                                 "input[type=checkbox]")]
    assert len(starts) >= 12 and max(starts) - min(starts) <= 8, starts  # was 380-768 px
    preset = next(el for el in controls(form, "select") if "detailed: rank 64, half strength" in el.text)
    Select(preset).select_by_visible_text("detailed: rank 64, half strength")
    nb.driver.implicitly_wait(1)
    nb.run(4, 6)
    run = nb.output(4).text
    assert "settings: rank 64, alpha 32, strength 0.5" in run  # the preset chosen in the page reached the run
    assert re.search(r"\branks 64\b", run), run
    assert re.search(r"100%.*?(\d+)/\1", run), run  # the bar reached its end
    assert "Traceback" not in run
    results = nb.output(5)
    assert len(controls(results, "table tr")) >= 5
    assert images_rendered(nb, results), results.get_attribute("innerHTML")[-1500:]
    href = download_link(nb.output(6))
    written = lab.root / "work" / "extracted_lora.safetensors"
    assert nb.fetch_size(href) == written.stat().st_size
    assert nb.output(6).text.count("extracted_lora.safetensors") == 1
    assert not widget_console_errors(nb)


def test_resize_notebook_in_jupyterlab(page, lab):
    nb = page("resize_lora.ipynb")
    nb.run(0, 5)
    form = nb.output(3)
    assert not widget_problems(form)
    assert "threshold" in text(form) and "what the base already does" in text(form)
    assert len(controls(form, "select")) >= 3 and len(controls(form, "textarea")) == 1
    run = nb.output(4).text
    assert "Traceback" not in run and "->" in run, run
    assert re.search(r"100%.*?(\d+)/\1", run), run
    assert len(images_rendered(nb, nb.output(4))) >= 1
    href = download_link(nb.output(5))
    name = href.split("?")[0].rsplit("/", 1)[-1]
    assert nb.fetch_size(href) == (lab.root / "work" / name).stat().st_size
    assert not widget_console_errors(nb)


@pytest.mark.parametrize("started_in", ["notebooks folder", "home folder"])
def test_the_save_line_works_wherever_jupyterlab_was_started(tmp_path_factory, tmp_path, started_in):
    """Wherever JupyterLab was started (the notebooks' folder, or the home folder above it), the default work
    folder is `lora_colab_work` in the folder it serves, so the save cell's download link serves the file."""
    home = tmp_path_factory.mktemp("lab") / "home"
    notebooks = home / "lora_colab" / "notebooks"
    notebooks.mkdir(parents=True)
    shutil.copy(NOTEBOOKS / "extract_lora.ipynb", notebooks)
    root = notebooks if started_in == "notebooks folder" else home
    server = JupyterLab(root, env={"HOME": str(home), "LORA_COLAB_WORKDIR": None,
                                   "LORA_COLAB_CACHE": str(home / "cache")}, config_folder=home.parent)
    driver = chromium(tmp_path / "downloads")
    nb = None
    try:
        nb = Notebook(driver, server, "extract_lora.ipynb" if root == notebooks else
                      "lora_colab/notebooks/extract_lora.ipynb")
        nb.run(0, 6)
        saved = nb.output(6)
        written = root / "lora_colab_work" / "extracted_lora.safetensors"
        assert written.exists(), text(saved)
        assert nb.fetch_size(download_link(saved)) == written.stat().st_size
    except Exception:
        if nb is not None:
            nb.save_evidence(tmp_path, started_in.replace(" ", "_"))
        raise
    finally:
        driver.quit()
        server.close()
