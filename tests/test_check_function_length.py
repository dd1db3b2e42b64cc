"""tools/check_function_length.py: the small-functions check `make test` runs finds a long function or
method (nested ones too), leaves numba kernels out, and passes on the package itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("check_function_length", REPO / "tools" / "check_function_length.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_function_length"] = module
    spec.loader.exec_module(module)
    return module


def _body(n: int) -> str:
    return "".join(f"    x{i} = {i}\n" for i in range(n - 1))


def test_long_functions_are_found_and_kernels_left_out(tmp_path, capsys):
    tool = _tool()
    pkg = tmp_path / "soco_det"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        f"def short():\n{_body(80)}\n"  # 80 lines: allowed
        f"def long():\n{_body(81)}\n"
        f"class K:\n    def method(self):\n{_body(90).replace('    ', '        ')}\n"
        f"import numba\n@numba.njit(cache=True)\ndef kernel():\n{_body(200)}\n"
        f"@njit\ndef kernel2():\n{_body(200)}\n"
    )
    lengths = {name: n for n, _, name in tool.function_lengths(pkg)}
    assert lengths == {"short": 80, "long": 81, "K.method": 90}
    assert tool.main(["--package", str(pkg)]) == 1
    listed = [line for line in capsys.readouterr().out.splitlines() if "lines (max 80)" in line]
    assert listed == ["soco_det/a.py:165: K.method is 90 lines (max 80)", "soco_det/a.py:82: long is 81 lines (max 80)"]


def test_the_package_has_no_function_over_80_lines(capsys):
    assert _tool().main([]) == 0, capsys.readouterr().out
