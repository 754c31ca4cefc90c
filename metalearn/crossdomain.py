"""Cross-domain evaluation: a trained run's model on the test classes of another dataset.

`metalearn eval run_dir=R dataset=<name> [dataset.* keys]` (see :mod:`metalearn.run_config`
for how the config is formed). The other dataset's test images are put into the run's input
form by the run's recorded preprocessing (:func:`metalearn.preprocess.fit_images`: channels,
size, polarity); an image folder is used whole (its test/ folder for a train/val/test
layout), so it needs no train or validation classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from metalearn.data.common import ClassImages
from metalearn.preprocess import describe, describe_applied, fit_images
from metalearn.tasks import TaskSource, image_source, load_image_arrays


def dataset_summary(dataset: Any) -> dict:
    """The keys that say which data a dataset section means (for results.json)."""
    summary = {"name": str(dataset.name)}
    if dataset.name == "omniglot":
        summary["variant"] = str(dataset.variant)
    if dataset.name == "image_folder":
        summary["path"] = str(dataset.path)
    if dataset.name != "sinusoid":
        summary.update(n_way=int(dataset.n_way), k_shot=int(dataset.k_shot), k_query=int(dataset.k_query))
    return summary


def cross_domain_source(cfg: Any, record: dict, say=print) -> tuple[TaskSource, dict]:
    """The test split of ``cfg.dataset`` in the run's input form, as a TaskSource whose only
    split is ``test``; and what was read and applied (for results.json). Prints one line."""
    d = cfg.dataset
    if d.name == "image_folder":
        from metalearn.data.image_folder import load_test_folder

        test, _, where = load_test_folder(d.path, int(d.image_size), int(d.channels))
    else:
        test = load_image_arrays(d)["test"]
        where = f"the test split of {d.name}" + (f" ({d.variant})" if d.name == "omniglot" else "")
    if isinstance(test, ClassImages):
        fitted, done = fit_images(test.images, record, cfg.preprocess.invert)
        test = ClassImages(fitted, test.counts)
        n_classes, n_images = len(test.counts), int(np.sum(test.counts))
    else:
        test, done = fit_images(test, record, cfg.preprocess.invert)
        n_classes, n_images = int(test.shape[0]), int(test.shape[0] * test.shape[1])
    source = image_source(d, {"test": test})
    say(
        f"metalearn: cross-domain: {where}, {n_classes} classes / {n_images} images; run's preprocessing "
        f"({describe(record)}) applied: {describe_applied(done, record)}",
        flush=True,
    )
    info = {"read": where, "classes": n_classes, "images": n_images, "applied": done}
    return source, info
