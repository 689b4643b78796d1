"""Where this package's property files are, and which of them a ``Config`` reads.

Its own module because both the ``Config`` (which loads the files) and ``settings`` (which derives
the known setting names from them) need it, and ``config`` imports ``settings``.
"""

from pathlib import Path


def properties_dir():
    """The folder holding ``sequential.yaml``, ``model/`` and ``dataset/``.

    A wheel install ships it inside the package; a source checkout (editable install or
    ``python run_recbole.py`` in the clone) has it at the repository's top level.
    """
    here = Path(__file__).resolve().parent
    installed = here / "properties"
    return installed if installed.is_dir() else here.parent / "properties"


def property_files(model, dataset, sequential):
    """This package's property files a ``Config`` reads after RecBole's own, lowest precedence first
    (those that exist). The sequential protocol (leave-one-out, full ranking, CE without sampled
    negatives) would break other model types, e.g. RecBole's general BPR model, which needs negatives."""
    properties = properties_dir()
    files = [
        properties / "overall.yaml",
        *([properties / "sequential.yaml"] if sequential else []),
        properties / "model" / f"{model}.yaml",
        properties / "dataset" / f"{dataset}.yaml",
    ]
    return [file for file in files if file.is_file()]
