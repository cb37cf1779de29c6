"""data_prep: tokenize corpora into ArrayRecord shards, train tokenizers, inspect datasets.

    python -m data_prep prepare --input corpus/ --output data/corpus --tokenizer byte
    python -m data_prep train-tokenizer --input corpus/ --output tok/sp --vocab_size 32000
    python -m data_prep inspect data/corpus

The on-disk format lives in `maxlite.data.shards`, shared with the trainer.
"""
