"""The command line: `fewstep samplers` and `fewstep report` (small settings)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import fewstep
from fewstep.cli import main


def test_samplers_table(capsys):
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    for name in fewstep.available():
        assert name in out
    assert main(["samplers", "-v"]) == 0
    assert "Lu et al." in capsys.readouterr().out


def test_report_small(tmp_path):
    out = tmp_path / "rep"
    # The exact-mixture part only; the FID part is tested in tests/test_eval_report.py.
    assert main(["report", "--out", str(out), "--samplers", "ddim,dpmpp_2m,dpmpp_2s", "--nfe", "1,4,10",
                 "--num-samples", "128", "--quiet", "--no-fid"]) == 0
    rows = list(csv.DictReader(open(out / "exact_mixture.csv")))
    assert len(rows) == 9
    err = {(r["sampler"], int(r["nfe"])): float(r["rmse"]) for r in rows}
    assert err[("dpmpp_2m", 10)] < err[("ddim", 10)] < err[("ddim", 4)]
    meta = json.loads((out / "exact_mixture.json").read_text())["meta"]
    assert meta["num_samples"] == 128
    md = (out / "report.md").read_text()
    assert "| dpmpp_2m |" in md and "exact_mixture.png" in md
    assert (out / "exact_mixture.png").stat().st_size > 10_000


def test_cli_errors_are_clear():
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "report", "--samplers", "dpmpp2m", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean 'dpmpp_2m'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "report", "--nfe", "0,3"], capture_output=True, text=True)
    assert r.returncode == 2 and "positive integers" in r.stderr
