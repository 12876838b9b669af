"""The main job runs from an installed (non-editable) package, from another directory."""

import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_package_runs_the_main_job(tmp_path):
    venv = tmp_path / "venv"
    # the venv sees this interpreter's torch (and the editable vitattn, which the venv's own
    # installed copy must shadow: the test checks which one ran)
    # --without-pip: the venv uses this interpreter's pip and setuptools (ensurepip would bring an
    # older setuptools without bdist_wheel)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=300)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VITATTN_BACKEND", "PYTHONPATH")}
    env["VITATTN_NO_EXT"] = "1"  # the packaging is under test here, not the C++ build
    res = subprocess.run([py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", ROOT],
                         capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "report"
    code = ("import vitattn, vitattn.benchmarks, vitattn.kernels, sys\n"
            "from vitattn.ops.masa import backends as b\n"
            "assert b.dispatcher.measured().get('cpu'), 'measured.json did not ship'\n"
            "print(vitattn.__file__); sys.exit(0 if 'site-packages' in vitattn.__file__ else 1)")
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([py, "-m", "vitattn.bench", "--quick", "--only", "masa", "--out-dir", str(out)],
                         capture_output=True, text=True, timeout=1200, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "masa" in report and (out / "report.json").exists()
