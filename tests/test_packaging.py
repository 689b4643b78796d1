"""The metadata says which Pythons are supported, and only --tool=ray needs ray (the install drops RecBole's pin)."""
import configparser
import os
import subprocess
import sys

import pytest

from packaging.specifiers import SpecifierSet

from conftest import REPO

# What README's Set-up promises; .ci/run dry-runs the install on every classified version the machine has.
PROMISED = ["3.10", "3.11", "3.12", "3.13"]


def test_python_requires_admits_exactly_the_classified_versions():
    metadata = configparser.ConfigParser()
    metadata.read(os.path.join(REPO, "setup.cfg"))
    classified = [line.rsplit("::", 1)[1].strip() for line in metadata["metadata"]["classifiers"].splitlines()
                  if line.startswith("Programming Language :: Python :: 3.")]
    requires = SpecifierSet(metadata["options"]["python_requires"])
    admitted = [f"3.{minor}" for minor in range(0, 30) if f"3.{minor}.0" in requires]
    assert classified == admitted and set(PROMISED) <= set(classified)


@pytest.mark.slow
def test_no_entry_point_or_module_imports_ray():
    """RecBole 1.2.1 pins ray<=2.6.3 (no wheels past 3.11); pyproject.toml's override leaves ray out
    unless the ``ray`` extra asks for it, and only a ``--tool=ray`` search imports it (ray_search.py).

    Besides, ``recbole.quick_start`` imports ray, so importing every module of the package, both scripts and
    hyperopt (which a search loads) must leave it out of ``sys.modules``.
    """
    probe = (
        "import importlib, pkgutil, sys\n"
        "import recbole_t2diff, hyperopt, run_recbole, run_hyper\n"
        "for module in pkgutil.walk_packages(recbole_t2diff.__path__, 'recbole_t2diff.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'ray' or name.startswith('recbole.quick_start')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_recboles_invalid_escape_sequences_print_nothing():
    """Python 3.12+ warns about the ``\\p`` in RecBole's dien.py whenever it compiles it (every run
    where bytecode is not cached): the compat shim silences it, so one-line errors stay one line."""
    probe = (
        "import recbole_t2diff, recbole.model.sequential_recommender.dien as dien\n"
        "compile(open(dien.__file__).read(), dien.__file__, 'exec')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "SyntaxWarning" not in done.stderr, done.stderr
