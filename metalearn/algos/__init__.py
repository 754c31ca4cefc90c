"""Registry of meta-learning algorithms: ``algo.name`` -> constructor(cfg, problem)."""

from metalearn.algos.adml import make_adml
from metalearn.algos.anil import make_anil
from metalearn.algos.base import MetaLearner, Problem, inner_sgd
from metalearn.algos.caml import make_caml
from metalearn.algos.imaml import make_imaml
from metalearn.algos.maml import make_maml
from metalearn.algos.mamlpp import make_mamlpp
from metalearn.algos.metasgd import make_metasgd
from metalearn.algos.pretrain import make_pretrain
from metalearn.algos.protomaml import make_protomaml
from metalearn.algos.protonet import make_protonet
from metalearn.algos.reptile import make_reptile

ALGORITHMS = {
    "maml": make_maml,
    "fomaml": make_maml,
    "adml": make_adml,
    "caml": make_caml,
    "metasgd": make_metasgd,
    "reptile": make_reptile,
    "anil": make_anil,
    "mamlpp": make_mamlpp,
    "imaml": make_imaml,
    "protonet": make_protonet,
    "protomaml": make_protomaml,
    "pretrain": make_pretrain,
}

# Algorithms that classify by distances to class prototypes: no regression, any number of
# ways (their training episodes may have more ways than the test's: dataset.n_way_train).
METRIC_ALGOS = ("protonet", "protomaml")

# Algorithms whose adaptation is not a loop of steps (Prototypical Networks classify by
# distances to the support prototypes); algo.inner_steps* do not apply to them.
# Supervised pre-training adapts by nearest class mean too (metalearn/algos/pretrain.py).
WITHOUT_INNER_LOOP = frozenset({"protonet", "pretrain"})


def test_steps(algo_cfg) -> int:
    """Inner steps of test-time adaptation (``algo.inner_steps_test``; 0 for an algorithm
    without an inner loop, whose schema has no such key)."""
    return int(algo_cfg.inner_steps_test) if "inner_steps_test" in algo_cfg else 0


def adaptation_phrase(name: str, steps: int) -> str:
    """How a result line names the test-time adaptation: " after N inner step(s)", or ""
    for an algorithm without an inner loop."""
    return "" if name in WITHOUT_INNER_LOOP else f" after {steps} inner step(s)"


def make_algorithm(cfg, problem: Problem) -> MetaLearner:
    """The algorithm named by ``cfg.name`` (its schema: config.SCHEMAS["algo"]) for this model
    and task source."""
    return ALGORITHMS[cfg.name](cfg, problem)


__all__ = [
    "ALGORITHMS",
    "METRIC_ALGOS",
    "WITHOUT_INNER_LOOP",
    "MetaLearner",
    "Problem",
    "adaptation_phrase",
    "inner_sgd",
    "make_algorithm",
    "test_steps",
]
