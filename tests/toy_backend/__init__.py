"""A toy backend for the registry test: one folder, one class, one registration. It 'builds' by
running the export in onnxruntime on a few inputs and recording the outputs' checksum."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitfold.export.backends import Backend, BuildResult, Requirement, staged_dir


class ToyBackend(Backend):
    name, board_kind, accepts, metric, unit = "toy", "cpu", ("qcdq",), "latency", "s"

    @dataclass
    class Options:
        samples: int = 4

    def build(self, onnx_path, board, out_dir, options=None, events=None):
        import json

        import onnxruntime as ort
        o = options or self.Options()
        if events is not None:
            events.say(f"toy build of {Path(onnx_path).name}")
        s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        shape = [o.samples] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        y = s.run(None, {inp.name: np.zeros(shape, np.float32)})[0]
        with staged_dir(Path(out_dir)) as d:
            (d / "build.json").write_text(json.dumps({"board": board.name, "outputs": y.shape}))
        return BuildResult(Path(out_dir), board.name, self.name, {"outputs": list(y.shape)}, verified=False)

    def requirements(self):
        return [Requirement("toy tool", ("dist", "onnxruntime"), "the toy backend", "pip install onnxruntime")]
