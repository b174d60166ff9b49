"""Every result table in the README is made by ``make tables`` from the committed data."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from analysis import store
from analysis.collect import collect
from analysis.make_tables import BLOCK, RESULTS, blocks, make_all, readme_blocks, update_readme


def test_readme_tables_are_generated_from_the_committed_data():
    found = readme_blocks(ROOT / "README.md")
    assert {"main", "v1_departures", "v1_ablation"} <= set(found)
    generated = blocks(collect(records=store.read(RESULTS / "records.jsonl")), RESULTS)
    for name, text in found.items():
        assert name in generated, f"README block {name!r} has no generator"
        assert text == generated[name], (
            f"README block {name!r} differs from what `make tables` makes from "
            f"analysis/results/; run `make tables` and commit README.md")


def _prose_and_tables() -> tuple[str, str]:
    """The README without its generated blocks, and those blocks."""
    text = (ROOT / "README.md").read_text()
    return BLOCK.sub("", text), "\n".join(readme_blocks(ROOT / "README.md").values())


def test_every_mean_and_spread_in_the_readme_prose_is_in_a_generated_table():
    """A figure typed by hand drifts: each ``mean ± std`` the prose quotes (a result, or a
    paired difference) must be one that ``make tables`` printed into the README."""
    import re

    prose, generated = _prose_and_tables()
    figures = re.findall(r"[-+]?\d+\.\d+ ± \d+\.\d+", prose)
    assert len(figures) > 50  # the pattern still finds the prose's figures
    typed = sorted({f for f in figures if f.lstrip("+") not in generated})
    assert not typed, f"README prose quotes figures no generated table has: {typed}"


def test_every_ratio_in_the_readme_prose_is_in_a_generated_table():
    """Speedups and time ratios drift too (a prose 1.82x read 1.81 once the table counted each
    Fisher pass once): each two-decimal ``N.NNx`` the prose quotes must be a generated table's
    ``N.NNx`` or a whole ``N.NN`` cell of one (the time-ratio columns). The paper's own
    published figures are not ours to generate."""
    import re

    published = {"1.56"}  # the paper's best latency reduction (../shared/METHOD.md)
    prose, generated = _prose_and_tables()
    ratios = re.findall(r"(?<![\d.])(\d+\.\d\d)x\b", prose)
    assert len(ratios) > 30  # the pattern still finds the prose's ratios
    typed = sorted({r for r in ratios if r not in published and f"{r}x" not in generated
                    and not re.search(rf"\|\s*{re.escape(r)}\s*\|", generated)})
    assert not typed, f"README prose quotes ratios no generated table has: {typed}"


def test_committed_records_are_of_the_current_schema_and_name_their_code():
    from experiments.records import Record

    for record in store.read(RESULTS / "records.jsonl"):
        assert Record.from_dict(record).code, f"{record['_source']}: no code digest"


def test_update_readme_replaces_only_known_blocks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- make-tables:main -->\nold\n<!-- /make-tables:main -->\n"
                      "text\n<!-- make-tables:other -->\nkept\n<!-- /make-tables:other -->\n")
    assert update_readme({"main": "| new |\n"}, readme) == ["other"]
    assert readme_blocks(readme) == {"main": "| new |\n", "other": "kept\n"}


def test_make_tables_writes_all_or_nothing(tmp_path, monkeypatch):
    """A failure half-way leaves the previous tables whole (no new CSV beside old markdown)."""
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out"
    make_all([], out, data)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr("analysis.make_tables.accuracy_vs_flops", broken)
    with pytest.raises(RuntimeError):
        make_all([], out, data)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_store_keeps_every_run_and_the_newer_record_of_one(tmp_path):
    from test_analysis import record

    old = store.compact(record(pruned=0.80), "a", 1.0)
    new = store.compact(record(pruned=0.85), "b", 2.0)
    other_seed = store.compact(record(pruned=0.70, seed=1), "a", 1.0)
    other_code = store.compact(record(pruned=0.60, code="other"), "c", 3.0)
    merged = store.merge([old, other_seed], [new, other_code])
    assert sorted(r["pruned"]["accuracy"] for r in merged) == [0.60, 0.70, 0.85]
    store.write(merged, tmp_path / "records.jsonl")
    assert store.read(tmp_path / "records.jsonl") == json.loads(json.dumps(merged))
    runs = collect(records=merged)
    assert sorted(runs["code"]) == ["c0de", "c0de", "other"]  # never pooled across code


def test_a_run_repeated_by_another_sweep_still_counts_in_the_first():
    """The same run made by two sweeps (e.g. the iterative sweep's default and the ablation's
    ``+weights``) is stored once, as its newer record, and belongs to both sweeps: a table of the
    first sweep must still find it, however the records arrive."""
    from test_analysis import record

    from analysis.tables import select

    first = store.compact(record(pruned=0.80, sweep="iterative_cpu"), "a", 1.0)
    again = store.compact(record(pruned=0.81, sweep="ablation_cpu"), "b", 2.0)
    other = store.compact(record(pruned=0.70, seed=1, sweep="iterative_cpu"), "a", 1.0)
    for stored, new in (([first, other], [again]), ([again], [first, other]),
                        (store.merge([first, other], [again]), [first])):
        merged = store.merge(stored, new)
        assert len(merged) == 2
        one = next(r for r in merged if r["seed"] == 0)
        assert one["pruned"]["accuracy"] == 0.81 and one["_sweeps"] == ["ablation_cpu",
                                                                          "iterative_cpu"]
        runs = collect(records=merged)
        assert sorted(runs["sweeps"]) == ["ablation_cpu,iterative_cpu", "iterative_cpu"]
        assert list(select(runs, sweep="iterative_cpu")["seeds"]) == ["0,1"]
    assert "_sweeps" not in store.merge([other], [])[0]


def test_the_readme_library_example_runs(tmp_path):
    """The README's "Use as a library" code, run as written on a tiny model and batches."""
    from conftest import tiny_batches, tiny_model, write_tokenizer
    from transformers import AutoTokenizer

    text = (ROOT / "README.md").read_text()
    start = text.index("## Use as a library")
    code = text[text.index("```python\n", start) + len("```python\n"):]
    code = code[:code.index("```")]
    write_tokenizer(tmp_path / "tok")
    model = tiny_model("bert", layers=2)
    before = sum(p.numel() for p in model.parameters())
    scope = {"model": model, "sample_batches": tiny_batches(2),
             "tokenizer": AutoTokenizer.from_pretrained(str(tmp_path / "tok"))}
    exec(compile(code.replace('"out/pruned"', repr(str(tmp_path / "pruned"))), "README", "exec"),
         scope)
    assert sum(p.numel() for p in model.parameters()) < before
    assert (tmp_path / "pruned" / "config.json").exists()


def test_store_keeps_the_output_check_of_tuning_and_drops_the_fits():
    from test_analysis import record

    checked = {**record(pruned=0.80), "tune": {"fits": [{"layer": 0}], "fallbacks": [],
                                               "output": {"before": 0.4, "weights": 0.2,
                                                          "chosen": "weights"}}}
    kept = store.compact(checked, "a", 1.0)
    assert kept["tune_output"] == {"before": 0.4, "weights": 0.2, "chosen": "weights"}
    assert "tune" not in kept
    assert "tune_output" not in store.compact(record(pruned=0.80), "a", 1.0)
