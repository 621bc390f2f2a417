"""drift_jax.evaluation.report: report.md's greedy-dialogue column says where the dialogue
fails, and the plots keep every method visible (own marker, offset, titled, 1.0 inside
the axes, every method in the legend)."""

from __future__ import annotations

import matplotlib.colors
import pytest

from drift_jax.evaluation import report

# Five turns, shaped like the comparison config's results: several methods share every
# value (sft_single and the reference; rft, drift and drift_all_turns, cost included).
UP = [0.2, 0.4, 0.6, 0.8, 1.0]
FLAT = [0.2] * 5


def _method(multi, rates, generated):
    return {**{f"multi@{k + 1}": v for k, v in enumerate(multi)}, "correction_rate": rates,
            "cost": {"generated_tokens": generated, "trained_tokens": 10, "wall_s": 1.0}}


RESULTS = {"methods": {
    "reference": _method(FLAT, [0.2, 0.0, 0.0, 0.0, 0.0], 0),
    "sft_single": _method(FLAT, [0.2, 0.0, 0.0, 0.0, 0.0], 1000),
    "sft": _method([0.2, 0.4, 0.6, 0.8, 0.8], [0.2, 0.25, 1 / 3, 0.5, 0.0], 1000),
    "rft": _method(UP, [0.2, 0.25, 1 / 3, 0.5, 1.0], 1000),
    "drift": _method(UP, [0.2, 0.25, 1 / 3, 0.5, 1.0], 1000),
    "drift_all_turns": _method(UP, [0.2, 0.25, 1 / 3, 0.5, 1.0], 1000),
    "online_rl": _method([0.2, 0.4, 0.6, 0.7, 0.9], [0.2, 0.25, 1 / 3, 0.25, 2 / 3], 3000),
    "drift_round2": _method(UP, [0.2, 0.25, 1 / 3, 0.5, None], 2000),
}}
PLOTS = (report.plot_multi_at_k, report.plot_cost, report.plot_correction_rate)

# answer_check's "greedy": one entry per turn while greedy decoding names an untried letter
# (margin > 0), then one with margin <= 0 whose letter greedy decoding does NOT name.
SFT_GREEDY = [{"answer": "A", "margin": 5.6}, {"answer": "B", "margin": 4.7}, {"answer": "C", "margin": 3.8},
              {"answer": "E", "margin": 2.5}, {"answer": "D", "margin": -1.4}]


def test_the_dialogue_column_names_the_moves_and_where_the_dialogue_fails():
    assert report.greedy_dialogue(SFT_GREEDY) == "A B C E (smallest margin +2.50), then no untried letter (-1.40)"
    assert report.greedy_dialogue(SFT_GREEDY[:4]) == "A B C E (smallest margin +2.50)"  # every turn a new letter
    assert report.greedy_dialogue([{"answer": "B", "margin": -0.25}]) == "no untried letter (-0.25)"
    assert report.greedy_dialogue([{"answer": "A", "margin": 2.0}, {"answer": "C", "margin": 0.0}]) == (
        "A (smallest margin +2.00), then no untried letter (+0.00)")  # a tie is not a move


def test_report_md_renders_the_dialogue_column():
    check = {"turns": [{"turn": t, "histories": 1, "greedy_untried": 1, "min_margin": 1.0} for t in (1, 2)],
             "greedy": SFT_GREEDY}
    results = {"methods": {"sft": RESULTS["methods"]["sft"]},
               "benchmarks": {"secret": {"sft": {**RESULTS["methods"]["sft"], "answer_check": check}}}}
    text = report.markdown(results, 5, title="t")
    row = next(line for line in text.splitlines() if line.startswith("| sft | 1/1"))
    assert row.endswith("| A B C E (smallest margin +2.50), then no untried letter (-1.40) |")
    assert " D " not in row  # the letter greedy decoding does not name is not listed


@pytest.mark.parametrize("plot", PLOTS, ids=lambda p: p.__name__)
def test_every_method_is_visible_and_named(plot, tmp_path):
    path = tmp_path / "plot.png"
    fig = plot(RESULTS, 5, str(path))
    assert path.stat().st_size > 0
    ax, = fig.axes
    assert ax.get_title()
    assert ax.get_ylim()[0] < 0.0 and ax.get_ylim()[1] > 1.0  # markers at 0 and 1 are not cut
    names = list(RESULTS["methods"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == set(names)
    styles = [(line.get_marker(), matplotlib.colors.to_hex(line.get_color())) for line in lines.values()]
    assert len({marker for marker, _ in styles}) == len(names), "each method has its own marker"
    assert len(set(styles)) == len(names)
    for line in lines.values():
        assert line.get_alpha() is not None and line.get_alpha() < 1  # overlaps show through
    # Methods with the same values are drawn apart: their markers' centres on the canvas differ.
    fig.canvas.draw()
    same = ("rft", "drift", "drift_all_turns")
    centres = {n: tuple(lines[n].get_transform().transform(lines[n].get_xydata()[-1]).round(1)) for n in same}
    assert len(set(centres.values())) == len(same)
    assert len({y for _, y in centres.values()}) == 1  # sideways only: the values read true


def test_the_cost_plot_names_a_method_without_generation_cost(tmp_path):
    results = {"methods": {"reference": RESULTS["methods"]["reference"],
                           "drift": {**RESULTS["methods"]["drift"],
                                     "cost": {"generated_tokens": None, "trained_tokens": 1, "wall_s": 1.0}}}}
    fig = report.plot_cost(results, 5, str(tmp_path / "cost.png"))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == "reference" and legend[1].startswith("drift (rollouts made elsewhere")


def test_the_cost_plot_pulls_apart_points_that_nearly_coincide(tmp_path):
    """online_rl 258 tokens, the offline methods 269, drift_round2 532, all at one multi@5 (a
    tiny comparison run): the close ones are spread until no two markers touch; a point
    far from every other stays exactly on its value."""
    methods = {name: _method(FLAT, [0.2, 0, 0, 0, 0], tokens)
               for name, tokens in (("reference", 0), ("sft", 269), ("drift", 269), ("online_rl", 258),
                                    ("drift_round2", 532))}
    fig = report.plot_cost({"methods": methods}, 5, str(tmp_path / "cost.png"))
    ax, = fig.axes
    fig.canvas.draw()
    px_per_pt = fig.dpi / 72
    centres = {line.get_label(): line.get_transform().transform(line.get_xydata()[0]) for line in ax.get_lines()}
    close = ("sft", "drift", "online_rl")
    for a in close:
        for b in close:
            if a < b:
                assert abs(centres[a][0] - centres[b][0]) >= report.OFFSET_PT * px_per_pt
    for far in ("reference", "drift_round2"):
        exact = ax.transData.transform((methods[far]["cost"]["generated_tokens"], 0.2))
        assert centres[far] == pytest.approx(exact)
