"""notebooks/losses.ipynb, executed headless on tiny runs trained by the test."""

import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "losses.ipynb"


def _kernel(folder: pathlib.Path, monkeypatch) -> str:
  """A kernel spec running this interpreter, found before any other: a fresh venv has no
  registered kernel, and a user-wide `python3` may be another Python without gptjax."""
  spec = folder / "kernels" / "gptjax-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "gptjax tests", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(folder))  # Searched before user and system paths.
  # Connection files and the IPython profile go here too, not into a home that CI may lack.
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(folder / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(folder / "ipython"))
  return "gptjax-test"


def test_the_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert not [c for c in notebook.cells if c.cell_type == "code" and c.outputs], (
      "clear the outputs of notebooks/losses.ipynb before committing it")


@pytest.mark.slow
def test_the_notebook_runs_headless_on_real_runs_and_saves_its_figures(
    tmp_path, monkeypatch, trained_runs):
  paths = trained_runs
  figures = tmp_path / "figures"
  monkeypatch.setenv("GPTJAX_RUNS", os.pathsep.join([paths["pipeline"], paths["replies_only"]]))
  monkeypatch.setenv("GPTJAX_FIGURES", str(figures))
  monkeypatch.setenv("MPLBACKEND", "Agg")  # No display: render to files only.
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      notebook, kernel_name=_kernel(tmp_path / "jupyter", monkeypatch), timeout=300,
      resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # Raises CellExecutionError, with the cell and traceback, on any error.
  assert sorted(p.name for p in figures.iterdir()) == [
      "comparison.png", "optimizer.png", "stages.png", "structure.png"]
  assert all(p.stat().st_size > 10_000 for p in figures.iterdir()), "figures with content"
  summary = notebook.cells[3].outputs[0]["data"]["text/plain"]
  assert "replies_only" in summary and "dialogue.history_weight" in summary
