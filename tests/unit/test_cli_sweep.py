"""Every command given wrong values, missing paths and paths of the wrong kind: one clear error
(exit 2, a message naming the problem), never a traceback, nothing written."""
import pytest

from bitfold.cli import main

BAD = [
    "export {nope}", "export {file}", "eval {dir}", "select {dir} --budget bitops<=5", "allocate {dir} --budget 10",
    "build {nope}.onnx -b host-cpu -o {out}", "build {dir} -b ulx3s-85f -o {out}", "build {file} -b icebreaker -o {out}",
    "build {file} -b nope -o {out}", "inspect {dir}", "inspect {nope}", "run-fpga {dir} --sim", "run-fpga {nope} --sim",
    "measure {dir} -b host-cpu --local", "measure {dir} -b ulx3s-85f --local", "report {file}", "report {dir}",
    "costs -b nope", "costs -b bitops", "hw show -b nope", "calibrate --energy-csv {dir}", "calibrate",
    "train --bits-map {dir} -o {out}", "train --config {file} -o {out}", "train --config {dir} -o {out}",
    "train --config {nope} -o {out}", "train --init-from {dir} -o {out} --epochs 1",
    "train --data fashion-mnist --data-dir {file} -o {out}", "train --data nope -o {out}",
    "train --method nope -o {out}", "fewshot -o {out} --seen a,b", "setup nothing", "boards {file}",
    "run -b nope -o {out}", "run -b host-cpu -o {out} --budget lut<=5",
    "run -b ulx3s-85f -o {out} --opt nope=1", "run -b ulx3s-85f -o {out} --opt max_bits=99",
    "export {dir} --out {out}", "train --epochs many -o {out}",   # unknown option, wrong type
    "sweep {nope} -o {out}", "sweep {file} -o {out}", "sweep {dir} -o {out}", "sweep {file} -o {out} --workers 0",
    "train --opt scales=decimal -o {out} --epochs 1", "export {dir} --for vivado", "demo --epochs 0",
]


@pytest.mark.parametrize("cmd", BAD)
def test_one_clear_error(cmd, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not what you think\n")
    args = cmd.format(nope=tmp_path / "missing", file=tmp_path / "afile", dir=tmp_path / "adir",
                      out=tmp_path / "out").split()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, (cmd, err)
    assert "Traceback" not in err and ("error" in err.lower() or "usage" in err.lower()), (cmd, err)
    assert not (tmp_path / "out").exists()
