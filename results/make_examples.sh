#!/usr/bin/env bash
# Rebuild the committed example reports (results/examples/<spec>/) from a demo run.
# Usage: bash results/make_examples.sh [SPEC NAME...]   (default: the four shipped specs)
# Each spec is run on the demo profile (stages already done in the workdir are reused; the specs
# share their pretrainings), then its report is written into results/examples/<spec>/.
set -euo pipefail
cd "$(dirname "$0")/.."
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(vision_tasks pretraining bert_init qa_pretraining)
for spec in "${specs[@]}"; do
    lxmert-bench run "ablations/$spec.yaml" --profile demo --no-report
    # the committed example is replaced whole (its owner file, which names this checkout's spec
    # path, is not committed, so report would refuse to write over the folder)
    rm -rf "results/examples/$spec"
    lxmert-bench report "ablations/$spec.yaml" --out "results/examples/$spec"
done
