"""How Omniglot's 90-degree rotations enter the tasks: ``dataset.rotation_sampling``.

* ``classes``: each rotation of a character is a class of the character's split (the data
  holds 4 classes per character), in every split; two rotations of one character can share
  a task, and test tasks contain rotated characters.
* ``per_task`` (cbfinn/maml, data_generator.py): the data holds each character once; every
  task, in every split, rotates each of its classes by its own random multiple of 90 degrees
  (:func:`metalearn.tasks.rotate_classes`).
* ``per_task_train_only`` (MAML++'s code, AntreasAntoniou/HowToTrainYourMAMLPytorch data.py:
  ``rng.randint(0, 4)`` per class of a task, applied only when ``augment_images`` is on, i.e.
  for training tasks): as ``per_task`` for training tasks; validation and test tasks are the
  unrotated characters. Rotation is then augmentation, not extra classes.

``dataset.rotations=false`` turns rotations off whatever the rule. No TensorFlow or JAX here,
so config validation can import it.
"""

from __future__ import annotations

from typing import Any

ROTATION_SAMPLING = ("classes", "per_task", "per_task_train_only")


def rotated_splits(rule: str) -> tuple[str, ...]:
    """The splits whose tasks are rotated when sampled under ``rule`` (none for ``classes``:
    there the rotations are in the data)."""
    return {"per_task": ("train", "validation", "test"), "per_task_train_only": ("train",)}.get(rule, ())


def rotation_rule(dataset: Any) -> str:
    """The rule in effect, for records: ``none`` unless Omniglot with rotations on."""
    if getattr(dataset, "name", None) != "omniglot" or not getattr(dataset, "rotations", False):
        return "none"
    return getattr(dataset, "rotation_sampling", "classes")
