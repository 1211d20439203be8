"""``mmprm_tasks/scaling_curve.py``: the shipped curve of PRM quality against annotated paths, read
at a number of paths (log-linear, clamped to what was measured), the one-line comparison, the
plot with a PRM marked, and the demo's report line that uses them."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from mmprm_tasks.cli import where_the_demo_stands
from mmprm_tasks.scaling_curve import curve_at, load_curve, plot_curve_png, report_at, where_it_stands
from mmprm_tasks.settings import SCALING_CURVE_FILE, Settings


def _point(paths: int, labels: str, low: float, vote: float) -> dict:
    return {"scale": paths, "paths": paths, "labels": labels, "min": low, "weighted_vote": vote,
            "random": 0.525, "majority_vote": 0.711, "oracle": 0.922, "seconds": 1.0}


# A small curve in the bench report's shape (made-up figures: tests only).
CURVE = {
    "seed": 7, "n": 8, "consensus_threshold": 0.2, "cut_negatives": True, "demo_paths": 3000,
    "points": [_point(800, "mc", 0.40, 0.60), _point(800, "truth", 0.50, 0.70),
               _point(2000, "mc", 0.45, 0.65), _point(2000, "truth", 0.55, 0.75),
               _point(5000, "mc", 0.55, 0.75), _point(5000, "truth", 0.60, 0.80),
               _point(10000, "mc", 0.60, 0.80), _point(10000, "truth", 0.70, 0.85)],
}


def _write(tmp_path, curve=CURVE):
    path = tmp_path / "scaling_curve.json"
    path.write_text(json.dumps(curve))
    return path


def test_load_curve_reads_the_report_and_none_without_a_file(tmp_path):
    assert load_curve(_write(tmp_path)) == CURVE
    assert load_curve(tmp_path / "absent.json") is None
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a bench_toy_scaling report"):
        load_curve(tmp_path / "other.json")
    # The setting names the shipped file by default; the environment may point it elsewhere.
    assert Settings().scaling_curve == SCALING_CURVE_FILE
    assert SCALING_CURVE_FILE.parent.name == "toy" and SCALING_CURVE_FILE.name == "scaling_curve.json"


def test_load_curve_setting_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPRM_SCALING_CURVE", str(_write(tmp_path)))
    assert load_curve(Settings().scaling_curve) == CURVE


def test_curve_at_interpolates_on_a_log_scale():
    # Measured points are read as they are.
    at = curve_at(CURVE, 2000)
    assert (at["min"], at["weighted_vote"], at["clamped"], at["at"]) == (0.45, 0.65, False, 2000)
    assert at["measured"] == [800, 10000] and at["n"] == 8 and at["labels"] == "mc"
    # Half way between 2,000 and 5,000 on a log scale is their geometric mean, not 3,500.
    middle = curve_at(CURVE, math.sqrt(2000 * 5000))
    assert middle["min"] == pytest.approx(0.50) and middle["weighted_vote"] == pytest.approx(0.70)
    assert not middle["clamped"]
    linear = curve_at(CURVE, 3500)
    assert linear["min"] > 0.50  # log(3500) is past the log midpoint
    assert linear["min"] == pytest.approx(0.45 + 0.10 * math.log(3500 / 2000) / math.log(5000 / 2000))
    # The baselines come along (the same candidates for every point).
    assert (linear["random"], linear["majority_vote"], linear["oracle"]) == pytest.approx((0.525, 0.711, 0.922))
    # Another label set.
    assert curve_at(CURVE, 10000, labels="truth")["min"] == 0.70


def test_curve_at_clamps_to_the_measured_range():
    below = curve_at(CURVE, 100)
    assert below["clamped"] and below["at"] == 800 and below["paths"] == 100 and below["min"] == 0.40
    above = curve_at(CURVE, 50_000)
    assert above["clamped"] and above["at"] == 10000 and above["min"] == 0.60 and above["weighted_vote"] == 0.80
    assert curve_at(CURVE, 0)["clamped"] and curve_at(CURVE, 0)["at"] == 800
    one = {**CURVE, "points": [_point(1000, "mc", 0.5, 0.7)]}
    assert curve_at(one, 1000)["min"] == 0.5 and not curve_at(one, 1000)["clamped"]
    assert curve_at(one, 3000)["clamped"] and curve_at(one, 3000)["min"] == 0.5
    with pytest.raises(ValueError, match="'mc-hard'"):
        curve_at(CURVE, 1000, labels="mc-hard")


def test_where_it_stands_in_one_line():
    assert where_it_stands(CURVE, 2000, 0.5, 0.7) == (
        "at 2,000 paths the measured curve (seed 7, consensus-filtered, judge < 0.2, negatives cut, Best-of-8) "
        "gives min 45.0% / weighted vote 65.0%; this PRM: 50.0% / 70.0%")
    assert where_it_stands(CURVE, 20_000, 0.612, 0.8) == (
        "at 20,000 paths (more than the measured 800-10,000: its value at 10,000) the measured curve (seed 7, "
        "consensus-filtered, judge < 0.2, negatives cut, Best-of-8) gives min 60.0% / weighted vote 80.0%; "
        "this PRM: 61.2% / 80.0%")
    plain = {**CURVE, "consensus_threshold": None}
    assert where_it_stands(plain, 500, None, None) == (
        "at 500 paths (fewer than the measured 800-10,000: its value at 800) the measured curve (seed 7, "
        "no consensus filtering, Best-of-8) gives min 40.0% / weighted vote 60.0%; "
        "this PRM: no Best-of-8 in its report")
    assert where_it_stands(CURVE, 10000, 0.5, None, aggregator="last").endswith("this PRM: 50.0% (last) / ?")
    assert "(truth labels)" in where_it_stands(CURVE, 10000, 0.5, 0.7, labels="truth")


def test_report_at_reads_the_row_of_the_curves_n():
    report = {"rows": [{"n": 4, "accuracy": {"min": 0.4, "last": 0.3}, "weighted_vote": 0.6},
                       {"n": 8, "accuracy": {"min": 0.5, "last": 0.45}, "weighted_vote": 0.7}],
              "headline": {"n": 8, "aggregator": "last", "accuracy": 0.45}}
    assert report_at(report, 8) == {"n": 8, "aggregator": "min", "accuracy": 0.5, "weighted_vote": 0.7}
    assert report_at(report, 4)["accuracy"] == 0.4
    assert report_at(report, 16) is None and report_at(None, 8) is None
    no_min = {"rows": [{"n": 8, "accuracy": {"last": 0.45}}], "headline": {"n": 8, "aggregator": "last"}}
    assert report_at(no_min, 8) == {"n": 8, "aggregator": "last", "accuracy": 0.45, "weighted_vote": None}


def _red_pixels(png: bytes) -> int:
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return int((pixels == (214, 39, 40)).all(axis=-1).sum())  # tab:red


def test_plot_is_a_png_with_the_prm_marked():
    bare = plot_curve_png(CURVE)
    assert bare.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(bare)) as image:
        assert image.format == "PNG" and image.size == (750, 500)
    marked = plot_curve_png(CURVE, {"paths": 3000, "min": 0.52, "weighted_vote": 0.74})
    assert marked != bare and plot_curve_png(CURVE) == bare  # the same curve, the same picture
    assert _red_pixels(marked) > _red_pixels(bare) + 50  # the stars (the demo's line is faint red)
    # Either accuracy may be missing; a point without paths is not drawn.
    assert plot_curve_png(CURVE, {"paths": 3000, "min": 0.52, "weighted_vote": None}) not in (bare, marked)
    assert plot_curve_png(CURVE, {"paths": None, "min": 0.52, "weighted_vote": 0.74}) == bare


COUNTS = {"paths": 3000, "consensus_paths": 3700, "consensus_kept": 3000}


def test_where_the_demo_stands_on_the_curve():
    report = {"rows": [{"n": 8, "accuracy": {"min": 0.688}, "weighted_vote": 0.852}],
              "headline": {"n": 8, "aggregator": "min", "accuracy": 0.688}}
    line = where_the_demo_stands(COUNTS, report, CURVE)
    assert line.startswith("where the demo stands: its PRMs learnt from 3000 MC-labelled paths (consensus "
                           "filtering kept 3000 of 3700")
    assert line.endswith("; " + where_it_stands(CURVE, 3000, 0.688, 0.852))
    assert "this PRM: 68.8% / 85.2%" in line
    # A report without the curve's N still places the demo's paths.
    assert where_the_demo_stands(COUNTS, {"rows": [{"n": 4, "accuracy": {"min": 0.6}}]}, CURVE).endswith(
        "this PRM: no Best-of-8 in its report")
    # No curve shipped: the sentence that points at the bench.
    without = where_the_demo_stands(COUNTS, report, None)
    assert "consensus filtering kept 3000 of 3700" in without and "bench/bench_toy_scaling.py draws" in without
    assert without == where_the_demo_stands(COUNTS)
