"""What the pipeline keeps on disk below retrieval: the encoded database as
VQ-GAN code indices (codes.py) in shards (shards.py), and verified reading of
the training stages' checkpoints (checkpoints.py). Built on files.py; never
imports retrieval, training or inference (codes.py borrows the VQ-GAN's
nearest-code search, and a damaged checkpoint marks its stage unfinished in
the workdir's record)."""
