#!/bin/bash
# usage: run_e2e.sh RUN_DIR
set -x
cd /work/wt/i12 && . /work/main/.venv/bin/activate && export PYTHONPATH=$PWD
R=$1; E=$PWD/outputs/e2e
date -u
time metalearn eval run_dir=$R dataset=image_folder dataset.path=$E/test_original
time metalearn eval run_dir=$R dataset=image_folder dataset.path=$E/test_training
time metalearn eval run_dir=$R dataset=image_folder dataset.path=$E/test_original preprocess.invert=false
time metalearn predict run_dir=$R support=$E/groups_original/g00/support query=$E/groups_original/g00/query
time python docs/runs/use_trained_model_omniglot/predict_groups.py $R $E/groups_original
time python docs/runs/use_trained_model_omniglot/predict_groups.py $R $E/groups_training
time python docs/runs/use_trained_model_omniglot/predict_groups.py $R $E/groups_original preprocess.invert=false
time metalearn eval run_dir=$R
date -u
