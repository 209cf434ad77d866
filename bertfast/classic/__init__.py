"""The systems BERT is explained against, as small, trainable, tested models.

One module per system, each readable alone:

    word2vec      skip-gram: one-hot -> W (vocab x 64) -> W' -> softmax over the vocabulary,
                  full softmax or negative sampling; nearest neighbours and a - b + c analogies
    bow           bag-of-words logistic regression (tf-idf features): the baseline classifier
    textcnn       Kim's sentence CNN: filters spanning the embedding width, 3 window sizes,
                  one max-pool per filter, dropout, softmax
    elmo          a forward and a backward LSTM language model; their layers, concatenated and
                  mixed with learned weights, as features for a classifier
    seq2seq       RNN encoder-decoder with additive (Bahdanau) attention; greedy and beam decoding
    transformer   Transformer encoder-decoder on bertfast's fused ops; greedy and beam decoding
                  with an incremental (KV) cache
    gpt           a causal Transformer language model on bertfast's fused ops; sampling with
                  temperature / top-k / top-p and a KV cache

Shared pieces: `text` (word/char vocabularies, batching), `datasets` (real labelled data
found on the machine), `training` (one small training loop), `decoding` (greedy and beam
search over any step function), `layers` (Transformer layers on bertfast.ops).

Command line: `bertfast classic <system> <action> ...` and `bertfast compare`.
"""
SYSTEMS = ("word2vec", "bow", "textcnn", "elmo", "seq2seq", "transformer", "gpt")
