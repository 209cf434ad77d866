#!/usr/bin/env bash
# transformers' shared model tests on one BERT-family model_type, plain or with every model they
# build accelerated by bertfast (plugin.py), from the repository root:
#
#   benchmarks/peer_tests/run.sh bert plain        OUT_DIR
#   benchmarks/peer_tests/run.sh bert accelerated  OUT_DIR
#   python benchmarks/peer_tests/summarize.py OUT_DIR      # failures plain vs accelerated, share served
#
# Needs transformers' sdist tests (TF_TESTS, default /tmp/tf/transformers-<installed>/tests:
#   pip download --no-deps --no-binary :all: transformers==<installed> -d /tmp/tf && tar xzf ...).
# The sdist lacks tests/exporters, tests/generation and tests/utils: empty stand-ins take their place
# (the export and generation mixins' tests drop out of both runs alike).
set -euo pipefail
model_type=$1 mode=$2 out=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=${PYTHON:-python3}
ver=$($py -c "import transformers; print(transformers.__version__)")
src=${TF_TESTS:-/tmp/tf/transformers-$ver/tests}
[ -f "$src/test_modeling_common.py" ] || { echo "no transformers tests at $src (set TF_TESTS)" >&2; exit 2; }
work=${PEER_WORK:-/tmp/peer_tests-$ver}
if [ ! -f "$work/tests/__init__.py" ]; then
    mkdir -p "$work" && rm -rf "$work/tests" && cp -r "$src" "$work/tests"
    for d in "" exporters generation utils models; do touch "$work/tests/$d/__init__.py" 2>/dev/null || \
        { mkdir -p "$work/tests/$d"; touch "$work/tests/$d/__init__.py"; }; done
    echo "class ExportTesterMixin: pass" > "$work/tests/exporters/test_export.py"
    echo "class GenerationTesterMixin: pass" > "$work/tests/generation/test_utils.py"
    echo "config_common_kwargs = {}" > "$work/tests/utils/test_configuration_utils.py"
fi
cp "$here/testers.py" "$work/tests/peer_testers.py"
mkdir -p "$work/tests/models/$model_type" && touch "$work/tests/models/$model_type/__init__.py"
printf 'from ...peer_testers import make_test_case\n\n%sPeerModelTest = make_test_case("%s")\n' \
    "${model_type^}" "$model_type" > "$work/tests/models/$model_type/test_modeling_$model_type.py"
mkdir -p "$out"
args=(-q -p no:cacheprovider --rootdir "$work" --junitxml "$out/$model_type-$mode.xml")
if [ "$mode" = accelerated ]; then
    export PYTHONPATH="$here:$repo${PYTHONPATH:+:$PYTHONPATH}" PEER_REPORT="$out/$model_type-$mode.json"
    args+=(-p plugin)
elif [ "$mode" != plain ]; then
    echo "mode must be plain or accelerated, got $mode" >&2; exit 2
fi
cd "$work"
# test-only imports of transformers' tests that the test extra lacks (e.g. parameterized): PEER_DEPS
export PYTHONPATH="${PEER_DEPS:+$PEER_DEPS:}${PYTHONPATH:-}"
HF_HUB_OFFLINE=1 $py -m pytest "${args[@]}" "$@" "tests/models/$model_type/test_modeling_$model_type.py" \
    > "$out/$model_type-$mode.log" 2>&1 || true
tail -3 "$out/$model_type-$mode.log"
