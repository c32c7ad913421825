"""bench/bad_input.py, the issue-9 bad-input suite: its machinery (fast) and the whole run (slow)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bad_input.py"


def load_suite():
    spec = importlib.util.spec_from_file_location("bad_input_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return load_suite()


def result(suite, code, stderr="", stdout=""):
    return suite.Result(["x"], code, stdout, stderr, 0.1)


def test_suite_has_a_case_for_every_item_of_the_issue(suite):
    items = {c.item for c in suite.CASES}
    assert {str(i) for i in range(1, 12)} <= items
    assert {"also-umask", "also-unicode", "also-order", "also-messages"} <= items
    assert len(suite.CASES) >= 50
    names = [c.name for c in suite.CASES]
    assert len(set(names)) == len(names)


def test_classify_data_loss_wins_over_everything(suite):
    case = suite.Case("c", "1", "error", lambda ctx: [], needle="OUT")
    verdict, _ = suite.classify(case, result(suite, 2, "phenolens translate: error: OUT x: bad"), ["a.tif (gone)"], None)
    assert verdict == "data-loss"


def test_classify_traceback_and_hang(suite):
    case = suite.Case("c", "11", "error", lambda ctx: [])
    tb = "Traceback (most recent call last):\n  File ...\nValueError: boom"
    assert suite.classify(case, result(suite, 1, tb), [], None)[0] == "traceback"
    assert suite.classify(case, result(suite, None), [], None)[0] == "traceback"


def test_classify_required_error_or_warning(suite):
    err = suite.Case("c", "10", "error", lambda ctx: [], needle="--ema-decay")
    assert suite.classify(err, result(suite, 0), [], None)[0] == "silently-wrong"
    line = "phenolens train: error: --ema-decay 1.5: must be in [0, 1)"
    assert suite.classify(err, result(suite, 2, line), [], None)[0] == "ok-error"
    assert suite.classify(err, result(suite, 2, "phenolens train: error: something else"), [], None)[0] == "unclear"
    warn = suite.Case("w", "4", "warn", lambda ctx: [])
    assert suite.classify(warn, result(suite, 0), [], None)[0] == "silently-wrong"
    assert suite.classify(warn, result(suite, 0, "warning: a.tif: 8-bit"), [], None)[0] == "ok-run"
    ok = suite.Case("o", "2", "ok", lambda ctx: [])
    assert suite.classify(ok, result(suite, 0), [], "two rows share one output file")[0] == "silently-wrong"
    assert suite.classify(ok, result(suite, 2, "phenolens x: error: no"), [], None)[0] == "refused"


def test_lost_files_sees_changed_and_gone_files_but_not_replaceable_ones(suite, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "a.tif").write_bytes(b"1")
    (tmp_path / "b.tif").write_bytes(b"2")
    (tmp_path / "out" / "x.tif").write_bytes(b"3")
    before = suite.snapshot(tmp_path)
    (tmp_path / "a.tif").write_bytes(b"changed")
    (tmp_path / "b.tif").unlink()
    (tmp_path / "out" / "x.tif").unlink()
    lost = suite.lost_files(before, suite.snapshot(tmp_path), ("out/*",))
    assert sorted(lost) == ["a.tif (changed)", "b.tif (gone)"]


def test_summary_line_counts_and_exit_status(suite):
    rows = [{"verdict": v} for v in ("ok-error", "ok-run", "data-loss", "traceback", "traceback")]
    line, bad = suite.summary(rows)
    assert line == "5 cases: 1 data loss, 2 tracebacks, 0 silently wrong"
    assert bad
    assert suite.summary([{"verdict": "ok-run"}]) == ("1 cases: 0 data loss, 0 tracebacks, 0 silently wrong", False)


def test_a_few_cases_run_through_the_real_cli(tmp_path):
    """Four cases of the CLI's own checks (--config values, --save-config, --no-judges) end to end."""
    only = "config-steps-text,config-inversion-not-a-choice,save-config-under-a-file,config-loses-to---no-judges"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", only, "--workspace", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("case"), proc.stdout + proc.stderr
    table = {ln.split()[0]: ln for ln in lines[1:-1]}
    assert set(table) == set(only.split(","))
    for name, line in table.items():
        assert " ok-error " in line and " yes " in line, line
    assert lines[-1] == "4 cases: 0 data loss, 0 tracebacks, 0 silently wrong"
    assert proc.returncode == 0


def test_list_names_every_case(suite):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines()[-1] == f"{len(suite.CASES)} cases"


@pytest.mark.slow
def test_whole_bad_input_suite_has_no_data_loss_traceback_or_silent_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workspace", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=3600)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("0 data loss, 0 tracebacks, 0 silently wrong") and proc.returncode == 0, proc.stdout
