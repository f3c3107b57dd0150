"""MkDocs hook: serve the studies' READMEs (experiments/**/README.md) and the files they show as pages.

A study writes its results next to its code (experiments/<study>/README.md, pictures, tables). This hook
adds those files to the site under the same path (experiments/<study>/), so docs/results.md links them and
`mkdocs build --strict` checks every such link, including the studies' links to their own pictures.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SHOWN = {".md", ".png", ".jpg", ".jpeg", ".svg", ".gif"}


def study_files() -> list[str]:
    """Paths (relative to the repository) of the committed study files the site shows; every file when not in git."""
    try:
        listed = subprocess.run(["git", "ls-files", "experiments"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [p.relative_to(ROOT).as_posix() for p in (ROOT / "experiments").rglob("*") if p.is_file()]
    return sorted(rel for rel in listed if Path(rel).suffix.lower() in SHOWN and (ROOT / rel).is_file())


def on_files(files: Files, config) -> Files:
    for rel in study_files():
        if files.get_file_from_path(rel) is not None:
            continue
        files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
