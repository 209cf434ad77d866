#!/usr/bin/env bash
# One bounded CPU training run per classic system, from the command line, on real text found
# on the machine (Debian's licence and package docs; the Python stdlib's docstrings), each
# with its held-out metric and trivial baseline. Usage:
#   benchmarks/classic_runs.sh OUT_DIR [SECONDS_PER_RUN (default 60)] [THREADS (default 1)]
# Writes OUT_DIR/runs.jsonl (one JSON line per run), OUT_DIR/samples.txt and the model folders
# under OUT_DIR/models/ (not meant to be committed).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/classic_runs.sh OUT_DIR [SECONDS_PER_RUN] [THREADS]}
secs=${2:-60}
threads=${3:-1}
data="$out/data"
models="$out/models"
mkdir -p "$data" "$models"
: > "$out/runs.jsonl"

# real data: labelled docstring sentences, reversal pairs of real words, and plain text
python3 -m bertfast classic data docstrings --out "$data/topics" > /dev/null
python3 -m bertfast classic data reversal --out "$data/reversal" > /dev/null
python3 - "$data" <<'EOF'
import os, sys
from bertfast.classic.datasets import in_test_split
from bertfast.testing import system_sentences
sents = system_sentences(20000)
with open(os.path.join(sys.argv[1], "text_train.txt"), "w") as tr, \
        open(os.path.join(sys.argv[1], "text_test.txt"), "w") as te:
    for s in sents:
        (te if in_test_split(s, 0.1) else tr).write(s + "\n")
EOF

run() {  # run NAME ARGS...: one training command, its JSON result appended to runs.jsonl
    local name=$1; shift
    echo "== $name" >&2
    python3 -m bertfast classic "$@" --threads "$threads" --time-limit "$secs" --log-every 0 | tail -n 1 \
        | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['run']='$name'; print(json.dumps(r))" \
        >> "$out/runs.jsonl"
}

run word2vec-negative word2vec train --train "$data/text_train.txt" --test "$data/text_test.txt" \
    --out "$models/w2v-neg" --loss negative --steps 100000 --lr 0.01
run word2vec-softmax word2vec train --train "$data/text_train.txt" --test "$data/text_test.txt" \
    --out "$models/w2v-softmax" --loss softmax --steps 100000 --lr 0.01
run bow bow train --train "$data/topics/train.tsv" --test "$data/topics/test.tsv" --out "$models/bow"
run textcnn textcnn train --train "$data/topics/train.tsv" --test "$data/topics/test.tsv" \
    --out "$models/textcnn" --steps 100000
run elmo elmo train --train "$data/text_train.txt" --labelled "$data/topics/train.tsv" \
    --test "$data/topics/test.tsv" --out "$models/elmo" --steps 100000 --classifier-steps 100000 --vocab 5000
run seq2seq seq2seq train --train "$data/reversal/train.tsv" --test "$data/reversal/test.tsv" \
    --out "$models/seq2seq" --steps 100000 --hidden 128 --emb 64
run transformer transformer train --train "$data/reversal/train.tsv" --test "$data/reversal/test.tsv" \
    --out "$models/transformer" --steps 100000 --hidden 128 --layers 2 --heads 4 --ffn 256
run gpt gpt train --train "$data/text_train.txt" --test "$data/text_test.txt" --out "$models/gpt" \
    --steps 100000 --hidden 128 --layers 2 --heads 4 --ffn 256 --max-len 48 --vocab 5000

{
    echo "# word2vec neighbours and analogy"
    python3 -m bertfast classic word2vec neighbours --model "$models/w2v-neg" license --k 8
    python3 -m bertfast classic word2vec neighbours --model "$models/w2v-neg" software --k 8
    python3 -m bertfast classic word2vec analogy --model "$models/w2v-neg" gpl gnu bsd
    echo "# seq2seq / transformer (beam 4)"
    python3 -m bertfast classic seq2seq translate --model "$models/seq2seq" --beam 4 "d o c u m e n t" "k e r n e l"
    python3 -m bertfast classic transformer translate --model "$models/transformer" --beam 4 \
        "d o c u m e n t" "k e r n e l"
    echo "# gpt samples (temperature 0.8, top-k 40, top-p 0.95, KV cache)"
    python3 -m bertfast classic gpt sample --model "$models/gpt" --prompt "This program is" --samples 3
} > "$out/samples.txt"
