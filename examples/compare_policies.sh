#!/usr/bin/env bash
# Policy comparison on the shipped tiny model, on this machine's CPUs: 3 cache sizes x 5 policies,
# then the Fig. 8 / Fig. 9-shaped plots and a CSV of every run under report/policies/. Extra
# arguments go to the sweep, e.g. `examples/compare_policies.sh eval.limit=10` for a quick look.
# Relaunching continues where a previous launch stopped (finished runs are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m sweep -m mlflow.experiment=policies \
    cache=frac_10,frac_25,frac_50 \
    policy=cache_prior_highbit,lru_highbit,lru_lowbit,dbsc,dbsc_pcw \
    "$@"
python -m sweep.report --experiment policies
echo "browse: mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"
