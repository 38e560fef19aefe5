"""`cbir study NAME`: the measurements behind cbir's defaults, made on validation data only.

Every study splits the data by patient into k folds (`cbir.data.splits.SplitSpec`) and, inside each fold's
training part, uses only the training and validation patients: the fold's test patients are never loaded.
Each study writes NAME.json and NAME.md to its output folder, and its section of docs/results.md
(`--doc`) as it finishes.
"""

from cbir.studies import (  # noqa: F401  (they register the studies)
    appearance,
    detector,
    hash_weights,
    label_efficiency,
    selection,
    shift,
)
from cbir.studies.common import STUDIES, StudyOptions

__all__ = ["STUDIES", "StudyOptions"]
