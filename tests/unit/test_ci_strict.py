"""CI cannot be green with a feature off: under CI=true a skip naming a tool that .ci/run provides
fails; other skips (a named, unrelated reason) stay skips."""
from pathlib import Path

pytest_plugins = ["pytester"]

CASES = '''
import pytest

def test_tool_missing():
    pytest.skip("verilator is not installed")

def test_unrelated_skip():
    pytest.skip("a CUDA device is present")
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip("no_such_module_xyz", reason="apache-tvm is not installed")

def test_never():
    pass
'''


def _run(pytester, monkeypatch, ci, **files):
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(**files)
    monkeypatch.setenv("CI", ci)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_ci_turns_tool_skips_into_failures(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, "true", test_cases=CASES)
    assert r.parseoutcomes() == {"failed": 1, "skipped": 1}
    out = r.stdout.str()
    assert "CI=true: skipped for a tool that .ci/run provides" in out and "verilator is not installed" in out


def test_ci_turns_a_module_level_tool_skip_into_an_error(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, "true", test_modskip=MODULE_SKIP)
    assert r.ret != 0 and "module skipped for a tool that .ci/run provides" in r.stdout.str()


def test_without_ci_the_same_tests_skip(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, "", test_cases=CASES, test_modskip=MODULE_SKIP)
    assert r.ret == 0 and r.parseoutcomes() == {"skipped": 3}
