"""Where the Hydra configs (``conf/``) are, however ``diffusion_lab`` was installed.

``conf/`` lives at the repository's top level, next to the ``diffusion_lab/`` package. A built
wheel (``pip install .``) carries it *inside* the package: ``pyproject.toml`` maps ``conf/`` to
``diffusion_lab.conf``, so it is installed as ``site-packages/diffusion_lab/conf``.

* installed wheel: ``<site-packages>/diffusion_lab/conf``
* source checkout, editable install (``make install``): ``<repo>/conf``

The entry points pass the absolute ``CONFIG_PATH`` to ``@hydra.main``: it does not depend on
the current folder, and Hydra's ``--config-dir DIR`` still adds a user's own config folder
(e.g. ``DIR/experiment/mine.yaml``, selected with ``experiment=mine``) to the search path.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]

PACKAGED_CONF_DIR = _PACKAGE_DIR / "conf"  # in an installed wheel
SOURCE_CONF_DIR = _PACKAGE_DIR.parent / "conf"  # in the repository


def conf_dir() -> Path:
    """The packaged configs when this is an installed wheel, else the checkout's ``conf/``.

    The packaged copy wins: next to an installed package, ``../conf`` is ``site-packages/conf``,
    which may belong to some other distribution."""
    if (PACKAGED_CONF_DIR / "train.yaml").is_file():
        return PACKAGED_CONF_DIR
    return SOURCE_CONF_DIR  # when missing too, Hydra's "Primary config directory not found" names it


CONFIG_PATH: str = str(conf_dir())
