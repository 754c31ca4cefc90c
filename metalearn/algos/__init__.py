"""Registry of meta-learning algorithms: ``algo.name`` -> constructor(cfg, problem)."""

from metalearn.algos.base import MetaLearner, Problem, inner_sgd
from metalearn.algos.maml import make_maml

ALGORITHMS = {
    "maml": make_maml,
    "fomaml": make_maml,
}


def make_algorithm(cfg, problem: Problem) -> MetaLearner:
    """The algorithm named by ``cfg.name`` (an AlgoConfig) for this model and task source."""
    return ALGORITHMS[cfg.name](cfg, problem)


__all__ = ["ALGORITHMS", "MetaLearner", "Problem", "inner_sgd", "make_algorithm"]
