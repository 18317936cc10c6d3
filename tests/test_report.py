"""`inspect DIR --report OUT`: the data report page (pipeline/report.py), opened in headless Chromium."""
from __future__ import annotations

import pytest
from PIL import Image

from pipeline.inspect import run
from pipeline.report import edit_kind, thresholds
from tests.test_serve import _launch, playwright_api

BEAM = ["--runner", "DirectRunner"]


@pytest.fixture(scope="module")
def triplets(toy_captions, tmp_path_factory):
    from synth.job import run as synth

    out = tmp_path_factory.mktemp("report") / "low"
    synth(["--input", str(toy_captions[0]), "--output", str(out), "--quality", "low", "--image-weight", "0",
           "--band-low", "0.3", "--seed", "1", *BEAM])
    return out


def test_edit_kinds_and_thresholds_from_a_triplets_json():
    assert edit_kind({"edit": {"kind": "colour"}, "method": "toy-exact-edit"}) == "colour"
    assert edit_kind({"changes": [{"op": "replace"}, {"op": "insert"}, {"op": "replace"}]}) == "insert+replace"
    assert edit_kind({"method": "instructpix2pix-clip-filtered"}) == "instructpix2pix-clip-filtered"
    assert thresholds({"provenance": {"thresholds": {"directional": 0.2, "image_image": None}}}) == {
        "directional": [0.2]}
    assert thresholds({"provenance": {"band": [0.3, 0.98]}}) == {"similarity": [0.3, 0.98]}
    assert thresholds({"provenance": "a string"}) == {}


def test_a_triplet_report_has_its_plots_and_grids(triplets, tmp_path, capsys):
    assert run([str(triplets), "--report", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    for png in ("text_lengths.png", "dropped.png", "edit_kinds.png", "scores.png", "random.png", "lowest.png"):
        assert f"src='{png}'" in page
        assert Image.open(tmp_path / "rep" / png).size[0] > 100
    assert "A triplet dataset" in page and "<th>samples</th>" in page
    assert "report:" in capsys.readouterr().out


def test_a_report_inside_the_dataset_or_onto_a_file_is_refused(triplets, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run([str(triplets), "--report", str(triplets / "rep")])
    assert err.value.code == 2 and "inside the dataset" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        run([str(triplets), "--report", str(tmp_path / "file")])
    assert err.value.code == 2 and not (triplets / "rep").exists()


def test_the_caption_report_opens_in_headless_chromium(toy_captions, tmp_path):
    sync_api = playwright_api()
    assert run([str(toy_captions[0]), "--report", str(tmp_path / "rep")]) == 0
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page()
        page.goto((tmp_path / "rep" / "index.html").as_uri())
        page.wait_for_function("[...document.images].every(i => i.complete)")
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) >= 2 and all(w > 0 for w in widths)  # every plot and grid loaded
        assert "caption dataset" in page.inner_text("body")
        browser.close()
