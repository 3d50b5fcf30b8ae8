"""What a new user meets first: the README's commands as written, CLI wording, output and files."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import growkit
from growkit import Cost, Entry, Gallery, GrowthPlan
from growkit.core.plan import Edge, Edit

from .conftest import TinyResNet

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _cli_lines() -> list[str]:
    return [ln.strip() for b in _bash_blocks() for ln in b.splitlines() if ln.strip().startswith(".venv/bin/growkit ")]


def _growkit_cmd() -> list[str]:
    """The installed ``growkit`` program beside this interpreter (what ``.venv/bin/growkit`` is in CI)."""
    exe = Path(sys.executable).parent / "growkit"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "growkit.cli"]


def _run_readme_line(line: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/growkit"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(_growkit_cmd() + argv[1:], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_ci_installs_exactly_as_the_readme_says():
    first, second = _bash_blocks()[:2]
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")  # CI installs quietly
    steps = [s.strip() for s in first.strip().split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[-1] == ".venv/bin/python recipes/quickstart.py"
    for step in steps[:-1]:
        assert step in ci, f"README step {step!r} is not what .ci/run runs"
    assert second.strip().split()[:4] == [".venv/bin/python", "-m", "pytest", "-q"]
    # CI adds only -p no:cacheprovider (a clean checkout keeps no cache) to the README's command.
    ci_test = next(ln.strip() for ln in ci.splitlines() if "-m pytest" in ln)
    assert ci_test.replace(" -p no:cacheprovider", "") == second.strip()


def test_base_install_has_what_the_quickstart_and_cli_import():
    text = (ROOT / "pyproject.toml").read_text()
    base = text.split("[project.optional-dependencies]")[0]
    assert "scikit-learn" in base  # digits, for the quickstart and growkit grow --data digits


def test_readme_cli_trace_line_runs_as_written(tmp_path):
    line = next(ln for ln in _cli_lines() if " trace " in ln)
    r = _run_readme_line(line, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "growth points" in r.stdout and "layer4_1_act2" in r.stdout
    assert "name(/F,cC)" in r.stdout  # the eligible-inputs notation is explained where it is printed


@pytest.mark.slow
def test_readme_cli_examples_run_as_written(tmp_path):
    """Every ``.venv/bin/growkit`` line of the README, in order, in a fresh directory."""
    lines = _cli_lines()
    assert len(lines) >= 4
    for line in lines:
        r = _run_readme_line(line, tmp_path, timeout=1800)
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert (tmp_path / "run" / "gallery.png").is_file() and (tmp_path / "run" / "model.onnx").is_file()


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "quickstart.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "reload identical: True" in r.stdout
    assert (tmp_path / "quickstart_out" / "gallery.png").is_file()


# -------------------------------------------------------------------------- the CLI speaks CLI
def test_cli_missing_checkpoint_is_an_error_line_not_a_traceback(tmp_path, capsys):
    from growkit.cli import main

    rc = main(["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(tmp_path / "o"),
               "--checkpoint", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("growkit: error: --checkpoint") and "Traceback" not in err


def test_cli_refuses_to_grow_an_untrained_model_unless_asked(tmp_path, capsys):
    from growkit.cli import main

    argv = ["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trained base model" in err and "--base-epochs" in err and "--checkpoint" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert main(argv + ["--base-epochs", "-1"]) == 2


def test_cli_budget_error_uses_cli_syntax(tmp_path, capsys):
    from growkit.cli import main

    rc = main(["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(tmp_path / "o"),
               "--budget", "params=0.5", "--base-epochs", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "abs:params=" in err and "relative=False" not in err
    with pytest.raises(growkit.BudgetError, match="relative=False"):  # Python callers still read Python
        growkit.Budget(params=0.5)


def test_cli_resume_flag_and_wording(tmp_path, capsys):
    from growkit.cli import main

    out = tmp_path / "run"
    argv = ["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(out),
            "--rounds", "0", "--num-classes", "10", "--base-epochs", "0"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "resume=True" not in err and "checkpoint_dir" not in err
    assert main(argv + ["--resume"]) == 0


# -------------------------------------------------------------------------- output a person reads
def _gallery(one_point_hull: bool) -> Gallery:
    g = Gallery(val_size=300)
    g.add(Entry(0, None, Cost(20_000, 1_000_000), 0.0467, 0.2, GrowthPlan(), 0, "base"))
    edit = Edit("layer2_1_act2", (Edge("layer1_1_act2", "identity"),) * 3, "b0")
    g.add(Entry(1, 0, Cost(25_000, 1_300_000), 0.0533, 0.2, GrowthPlan(edits=[edit]), 1, "grown"))
    if not one_point_hull:
        g.add(Entry(2, 0, Cost(24_000, 1_200_000), 0.0400, 0.2, GrowthPlan(edits=[edit]), 1, "grown"))
    return g


def test_gallery_repr_and_report_read_as_percentages():
    g = _gallery(one_point_hull=False)
    r = repr(g)
    assert "0x" not in r and "3 entries" in r and "95.33 %" in r and "96.00 %" in r and "+20.0 % params" in r
    rep = g.report()
    assert "300 examples" in rep and "+25.0 %" in rep and "| 94.67 |" in rep and "layer2_1_act2 +3" in rep
    assert Gallery.from_dict(g.to_dict()).report() == rep


def test_gallery_plot_draws_hull_only_when_there_is_one_and_labels_growth():
    import matplotlib.pyplot as plt

    for one, want_hull in ((True, False), (False, True)):
        fig = _gallery(one).figure()
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert ("lower convex hull" in labels) is want_hull
        notes = [t.get_text() for t in ax.texts]
        assert "#0" in notes and "#1" in notes
        listing = fig.axes[1].texts[0].get_text()
        assert "#0  95.33 %  +0.0 %  base" in listing and "#1  94.67 %  +25.0 %  grown: layer2_1_act2 +3" in listing
        lo, hi = ax.get_ylim()
        se = 100 * (0.0533 * (1 - 0.0533) / 300) ** 0.5
        assert hi - lo >= 6 * se - 1e-9  # a 2-example difference does not fill the axis
        assert "300 examples" in ax.get_ylabel()
        plt.close(fig)


def test_progress_in_a_log_is_one_line_per_epoch(digits, capsys):
    from growkit.train import train_steps

    train_l, _ = digits
    model = TinyResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_steps(model, train_l, opt, epochs=2, progress=True, desc="phase")
    err = capsys.readouterr().err  # captured: not a terminal
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("phase 1/2: 10 batches in ") and "train acc" in lines[0]
    assert "it/s" not in err and "\r" not in err


def test_saved_files_are_readable_by_the_group(tmp_path):
    old = os.umask(0o022)
    try:
        grown = growkit.finalize(growkit.inject(TinyResNet(), torch.randn(1, 1, 16, 16), ops=("identity",)))
        out = growkit.save(grown, tmp_path / "g")
    finally:
        os.umask(old)
    for f in ("plan.json", "weights.safetensors"):
        assert (out / f).stat().st_mode & 0o777 == 0o644
