#!/bin/bash
# Issue 24: pre-training on Omniglot small 5w1s, then ProtoNet / MAML from it vs from scratch
# at equal total CPU time (user+sys from /usr/bin/time -v). Sequential; one job at a time.
set -euo pipefail
cd /work/main; . .venv/bin/activate
R=/work/runs/pre
OMNI="dataset=omniglot dataset.variant=small dataset.manual_dir=/work/shared/data/omniglot dataset.data_dir=/work/runs/pre/data dataset.n_way=5 dataset.k_shot=1 dataset.split=random model.bn_stats=batch trainer.progress=false"
cpu() { python - "$1" <<'PY'
import re,sys
t=open(sys.argv[1]).read()
u=float(re.search(r"User time \(seconds\): ([\d.]+)",t).group(1)); s=float(re.search(r"System time \(seconds\): ([\d.]+)",t).group(1))
print(f"{u+s:.1f}")
PY
}
train() { # name, overrides...
  local name=$1; shift
  [ -f $R/$name/results.json ] && return 0
  echo "metalearn train $* hydra.run.dir=$R/$name" > $R/$name.cmd
  /usr/bin/time -v metalearn train "$@" hydra.run.dir=$R/$name > $R/$name.log 2>&1
  cp $R/$name.cmd $R/$name/cmd.txt; cp $R/$name.log $R/$name/train.log
}

lane() { # algo, scratch steps
  local algo=$1 S=$2
  train ${algo}_scratch algo=$algo $OMNI trainer.steps=$S
  local TP=$(cpu $R/pretrain/train.log) TS=$(cpu $R/${algo}_scratch/train.log)
  local N=$(python -c "print(max(50, round($S*($TS-$TP)/$TS/10)*10))")
  echo "$algo: scratch $TS CPU-s for $S steps, pretrain $TP CPU-s -> $N steps from pretrain" | tee -a $R/budget.txt
  train ${algo}_from_pretrain algo=$algo $OMNI trainer.steps=$N model.init_from=$R/pretrain
}
lane maml 600 > $R/lane_maml.log 2>&1 &
lane protonet 1000 > $R/lane_protonet.log 2>&1 &
wait
echo DONE
