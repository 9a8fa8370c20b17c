"""The out-of-core demo without Dask and Zarr: a clear message, not a traceback (issue 10).

No ``importorskip`` here: this runs in every session, in a real interpreter in which
Dask and Zarr cannot be imported (blocked in ``sys.modules``, and really absent in the
sessions that do not install ``xpoptim[dask]``).
"""

from __future__ import annotations

import subprocess
import sys


def test_without_dask_the_demo_says_what_to_install(tmp_path):
    """A real interpreter in which dask and zarr cannot be imported."""
    code = (
        "import sys; sys.modules['dask'] = None; sys.modules['zarr'] = None\n"
        "from xpoptim.__main__ import main\n"
        f"sys.exit(main(['demo', '--out-of-core', {str(tmp_path / 'd')!r}, '--size', '2MB']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "the out-of-core store needs dask" in result.stderr
    assert "pip install 'xpoptim[dask]'" in result.stderr
    assert not (tmp_path / "d").exists()
