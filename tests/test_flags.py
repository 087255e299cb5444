"""Every numeric flag of the three stages has its range checked by argparse: a value out of range
(or not a number) is one line, `error: argument --flag: ...` naming the range, exit code 2,
before anything is loaded or written."""
import math
import re

import pytest

import common as C
from conftest import load_stage

STAGES = ("01_patch_clip.py", "02_align_s2.py", "03_eval.py")


def parser_of(stage, monkeypatch):
    """The stage's argparse parser, caught as parse_args is called."""
    class Caught(Exception):
        pass
    seen = {}

    def catch(self, argv=None, namespace=None):
        seen["parser"] = self
        raise Caught()
    monkeypatch.setattr(C.Flags, "parse_args", catch)
    with pytest.raises(Caught):
        stage.parse_args([])
    monkeypatch.undo()
    return seen["parser"]


def bad_values(kind, low, high, above):
    values = [str(low) if above else str(low - 1), "x"]
    if high is not None:
        values.append(str(high + 1))
    return values


@pytest.mark.parametrize("name", STAGES)
def test_every_numeric_flag_is_range_checked_in_one_line(name, monkeypatch, capsys, tmp_path):
    stage = load_stage(name)
    actions = [a for a in parser_of(stage, monkeypatch)._actions if a.option_strings]
    assert not [a.dest for a in actions if a.type in (int, float)]  # no unchecked number
    numeric = [a for a in actions if hasattr(a.type, "range")]
    assert len(numeric) >= 3
    for action in numeric:
        flag, (kind, low, high, above) = action.option_strings[0], action.type.range
        assert action.default is None or all(
            low <= v and (not above or v > low) and (high is None or v <= high)
            for v in (action.default if isinstance(action.default, list) else [action.default]))
        for value in bad_values(kind, low, high, above):
            with pytest.raises(SystemExit) as e:
                stage.main([flag, value, "--out", str(tmp_path / "never")])
            assert e.value.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith(f"error: argument {flag}"), err
            if value != "x":
                bound = f"> {low}" if above else f">= {low}"
                assert f"pass a value {bound}" in err and (high is None or f"<= {high}" in err), err
        good = str(high if high is not None else (low + 1 if above or kind is int else low))
        assert action.type(good) == kind(good) and not math.isnan(float(good))
    assert not (tmp_path / "never").exists() and not re.search("never", str(list(tmp_path.iterdir())))


def test_epochs_zero_and_negative_batch_are_refused_with_their_range(capsys):
    stage = load_stage("01_patch_clip.py")
    for argv, words in ((["--epochs", "0"], "argument --epochs: 0 is out of range: pass a value >= 1"),
                        (["--batch-size", "-1"], "argument --batch-size: -1 is out of range"),
                        (["--lr", "-1"], "argument --lr: -1 is out of range: pass a value > 0")):
        with pytest.raises(SystemExit):
            stage.main(argv)
        assert words in capsys.readouterr().err
