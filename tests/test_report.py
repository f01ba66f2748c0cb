"""`hf-medbeit benchmark`: argument checks (the table itself is tested in test_faults.py)."""

from __future__ import annotations

from conftest import assert_one_line_error, run_cli


def test_benchmark_output_that_is_a_directory_is_refused_before_any_run_is_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "all_results.json").write_text('{"test_auc": 0.')  # would be reported as corrupt if it were read
    table = tmp_path / "table.md"
    table.mkdir()
    result = run_cli("benchmark", str(run), "--output", str(table))
    assert_one_line_error(result, f"--output {table} is a directory", f"--output {table / 'results.md'}")
    assert "skipped" not in result.stderr
    assert list(table.iterdir()) == []
