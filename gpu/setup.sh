#!/usr/bin/env bash
# Run on the GPU machine (source it): installs carry/*.whl without network or dependency
# resolution into /tmp/kvmixpy, ahead of the preinstalled packages on PYTHONPATH.
# No `set -e` here: this file is sourced, so it must not change the caller shell's options.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/kvmixpy carry/*.whl
export PYTHONPATH=/tmp/kvmixpy${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import kvmix, transformers, torch; print('kvmix', kvmix.__file__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
