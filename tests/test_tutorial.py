"""docs/tutorial.ipynb runs as written: every cell executed in a fresh kernel (nbclient), from a
scratch folder, so the tutorial cannot rot."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_tutorial_notebook_executes_every_cell(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    monkeypatch.setenv("FLTAC_ROOT", str(ROOT))  # the kernel finds experiments/ from here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    assert "right (the engine:" in outputs
    assert any((tmp_path / "runs").glob("*/tutorial_curves.png"))  # the runs went to the scratch folder
