"""`metalearn predict` on every group folder (groups_<polarity>/gNN/{support,query}), in one
process: the same as running `metalearn predict run_dir=R support=G/support query=G/query`
per group, without paying the start-up per group. Prints one JSON line per group and the
total; summaries go to R/predict/<group>_<polarity>/.

    python docs/runs/use_trained_model_omniglot/predict_groups.py RUN_DIR GROUPS_DIR [key=value ...]
"""

import json
import sys
from pathlib import Path

from metalearn.config import register_configs
from metalearn.predict import run_predict
from metalearn.run_config import resolve


def main() -> None:
    from hydra import compose, initialize_config_dir

    from metalearn.cli import config_dir

    run_dir, groups, extra = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    register_configs()
    correct = total = 0
    for group in sorted(p for p in groups.iterdir() if p.is_dir()):
        overrides = [f"run_dir={run_dir}", f"support={group / 'support'}", f"query={group / 'query'}", *extra]
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            composed = compose(config_name="predict", overrides=overrides)
        out = run_dir / "predict" / f"{group.name}_{groups.name}"
        s = run_predict(resolve(run_dir, overrides, composed, "predict"), out, say=lambda *a, **k: None)
        correct, total = correct + s["correct"], total + s["query"]["with_true_class"]
        inverted = s["applied"]["query"]["inverted"]
        print(json.dumps({"group": group.name, "accuracy": s["accuracy"], "inverted_query": inverted}), flush=True)
    print(json.dumps({"groups": str(groups), "correct": correct, "total": total, "accuracy": correct / total}))


if __name__ == "__main__":
    main()
